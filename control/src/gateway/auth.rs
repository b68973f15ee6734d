//! Answering a PBX's digest challenge to a request the gateway sent (an INVITE of a Telegram
//! user's call, a `MESSAGE` with a Telegram user's text), sans-IO. A PBX that registers us
//! (`register_to_pbx`) usually also authenticates what we send it; without an answer every
//! call and text to it fails with the 401/407. One challenge per request is answered
//! (RFC 3261 §22.2: the same request again with `Authorization`/`Proxy-Authorization`, same
//! Call-ID and tags, CSeq + 1, a new branch); a second one means the credentials are wrong and
//! the request fails as before.

use crate::sip::call::branch;
use crate::sip::digest::{self, AuthError};
use crate::sip::msg::{SipRequest, SipResponse};

/// Our login and password at a PBX: a `register_to_pbx` connection's.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub login: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // The password never reaches logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("login", &self.login)
            .finish_non_exhaustive()
    }
}

/// Why a response cannot be answered with credentials.
#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    #[error("{0} is not a digest challenge")]
    NotAChallenge(u16),
    #[error("the {0} carries no {1}")]
    NoChallenge(u16, &'static str),
    #[error("the request has no CSeq or Via")]
    BadRequest,
    #[error(transparent)]
    Digest(#[from] AuthError),
}

/// Is `code` a challenge (401 from the PBX, 407 from a proxy in front of it)?
pub fn is_challenge(code: u16) -> bool {
    code == 401 || code == 407
}

/// `req` again, answering the challenge in `resp` (401: `WWW-Authenticate` →
/// `Authorization`; 407: `Proxy-Authenticate` → `Proxy-Authorization`) with the strongest
/// algorithm offered (SHA-256 over MD5), `qop=auth` when offered: same Call-ID and tags,
/// CSeq + 1, a new Via branch (a new transaction).
pub fn authorize(
    req: &SipRequest,
    resp: &SipResponse,
    creds: &Credentials,
) -> Result<SipRequest, ChallengeError> {
    let (challenge_name, answer_name) = match resp.code {
        401 => ("WWW-Authenticate", "Authorization"),
        407 => ("Proxy-Authenticate", "Proxy-Authorization"),
        other => return Err(ChallengeError::NotAChallenge(other)),
    };
    let challenge = resp
        .headers()
        .get_all(challenge_name)
        .collect::<Vec<_>>()
        .join(", ");
    if challenge.is_empty() {
        return Err(ChallengeError::NoChallenge(resp.code, challenge_name));
    }
    let answer = digest::respond(
        &challenge,
        req.method.as_str(),
        &req.uri,
        &creds.login,
        &creds.password,
        digest::new_cnonce,
        1,
    )?;
    let (cseq, _) = req.cseq().ok_or(ChallengeError::BadRequest)?;
    let via = req
        .headers()
        .top_via_str()
        .ok_or(ChallengeError::BadRequest)?;
    let via = with_new_branch(via);
    let mut out = req.clone();
    let h = out.headers_mut();
    h.replace_top_via(via);
    h.set(
        "CSeq",
        format!("{} {}", cseq.wrapping_add(1), req.method.as_str()),
    );
    h.remove(answer_name);
    h.add(answer_name, answer);
    Ok(out)
}

/// A Via value with its `branch` parameter replaced by a fresh one (added when missing).
fn with_new_branch(via: &str) -> String {
    let params: Vec<&str> = via
        .split(';')
        .filter(|p| {
            !p.trim_start()
                .get(..7)
                .is_some_and(|k| k.eq_ignore_ascii_case("branch="))
        })
        .collect();
    let mut out = params.join(";");
    out.push_str(&format!(";branch={}", branch()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::digest::{Algorithm, DigestServer};
    use crate::sip::msg::Method;
    use std::time::{Duration, SystemTime};

    fn invite() -> SipRequest {
        let mut r = SipRequest::new(Method::Invite, "sip:100@pbx.example".to_string());
        let h = r.headers_mut();
        h.add("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKold;rport");
        h.add("From", "<sip:+1000@127.0.0.1>;tag=f1");
        h.add("To", "<sip:100@pbx.example>");
        h.add("Call-ID", "c1@siptg");
        h.add("CSeq", "1 INVITE");
        r.body = b"v=0\r\n".to_vec();
        r
    }

    fn creds(password: &str) -> Credentials {
        Credentials {
            login: "gw".into(),
            password: password.into(),
        }
    }

    /// A PBX's challenge and its check of the answer, with the real digest server.
    fn challenged(code: u16, algorithms: &[Algorithm], password: &str) -> bool {
        let server = DigestServer::new("pbx", [9u8; 32], Duration::from_secs(60));
        let now = SystemTime::now();
        let req = invite();
        let mut resp = SipResponse::to(&req, code, "Unauthorized", Some("t"));
        let name = if code == 401 {
            "WWW-Authenticate"
        } else {
            "Proxy-Authenticate"
        };
        for c in server.challenge(now, false, algorithms) {
            resp.headers_mut().add(name, c);
        }
        let again = authorize(&req, &resp, &creds(password)).unwrap();
        assert_eq!(again.call_id(), Some("c1@siptg"));
        assert_eq!(again.header("From"), req.header("From"));
        assert_eq!(again.cseq(), Some((2, Method::Invite)));
        assert_ne!(
            again.headers().top_via_branch(),
            req.headers().top_via_branch()
        );
        assert!(again
            .headers()
            .top_via_str()
            .is_some_and(|v| v.starts_with("SIP/2.0/UDP 127.0.0.1:5060;rport;branch=z9hG4bK")));
        assert_eq!(again.body, req.body);
        let answer_name = if code == 401 {
            "Authorization"
        } else {
            "Proxy-Authorization"
        };
        let answer = again.header(answer_name).unwrap();
        if algorithms == [Algorithm::Sha256, Algorithm::Md5] {
            assert!(answer.contains("algorithm=SHA-256"), "{answer}");
        }
        assert!(answer.contains("qop=auth"), "{answer}");
        server
            .verify(
                "INVITE",
                answer,
                |u| (u == "gw").then(|| "right".to_string()),
                now,
            )
            .is_ok()
    }

    #[test]
    fn answers_401_and_407_with_md5_and_sha256() {
        assert!(challenged(401, &[Algorithm::Md5], "right"));
        assert!(challenged(407, &[Algorithm::Md5], "right"));
        assert!(challenged(
            401,
            &[Algorithm::Sha256, Algorithm::Md5],
            "right"
        ));
        assert!(!challenged(401, &[Algorithm::Md5], "wrong"));
    }

    #[test]
    fn a_response_without_a_challenge_is_an_error() {
        let req = invite();
        let resp = SipResponse::to(&req, 401, "Unauthorized", Some("t"));
        assert!(matches!(
            authorize(&req, &resp, &creds("x")),
            Err(ChallengeError::NoChallenge(401, "WWW-Authenticate"))
        ));
        let resp = SipResponse::to(&req, 486, "Busy Here", Some("t"));
        assert!(matches!(
            authorize(&req, &resp, &creds("x")),
            Err(ChallengeError::NotAChallenge(486))
        ));
    }
}
