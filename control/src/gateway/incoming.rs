//! Telegram → PBX, the Manager's part: who may call, which connection and Worker take the
//! call, and how the caller is presented (Caller ID and name templates, `X-TG-*` headers).

use crate::config::{ConnectionConfig, GatewayConfig};
use crate::telegram::resolve::{Peer, PeerQuery};

/// Does `peer` (or a caller known only by id) match the gateway's allowed callers? An empty
/// list allows everybody.
pub fn allowed(g: &GatewayConfig, user_id: i64, peer: Option<&Peer>) -> bool {
    if g.allowed_callers.is_empty() {
        return true;
    }
    g.allowed_callers
        .iter()
        .any(|who| match PeerQuery::parse(who) {
            Ok(PeerQuery::UserId(id)) => id == user_id,
            Ok(PeerQuery::Phone(p)) => peer.and_then(|x| x.phone.as_deref()) == Some(p.as_str()),
            Ok(PeerQuery::Username(u)) => peer
                .and_then(|x| x.username.as_deref())
                .is_some_and(|n| n.eq_ignore_ascii_case(&u)),
            Err(_) => false,
        })
}

/// The values templates may use.
pub struct CallerInfo<'a> {
    pub user_id: i64,
    pub peer: Option<&'a Peer>,
}

impl CallerInfo<'_> {
    fn value(&self, name: &str) -> Option<String> {
        let p = self.peer;
        match name {
            "userid" => Some(self.user_id.to_string()),
            "phone" => p.and_then(|p| p.phone.clone()).filter(|s| !s.is_empty()),
            "username" => p.and_then(|p| p.username.clone()).filter(|s| !s.is_empty()),
            "name" => p
                .map(|p| {
                    format!("{} {}", p.first_name, p.last_name)
                        .trim()
                        .to_string()
                })
                .filter(|s| !s.is_empty()),
            "name_ascii" => self
                .value("name")
                .map(|n| {
                    n.chars()
                        .filter(|c| c.is_ascii() && !c.is_ascii_control())
                        .collect::<String>()
                        .trim()
                        .to_string()
                })
                .filter(|s| !s.is_empty()),
            _ => None,
        }
    }

    /// The first template whose placeholders are all known, filled in.
    pub fn render(&self, templates: &[String]) -> Option<String> {
        'next: for t in templates {
            let mut out = String::new();
            let mut rest = t.as_str();
            while let Some(open) = rest.find('{') {
                out.push_str(&rest[..open]);
                let Some(close) = rest[open..].find('}') else {
                    continue 'next;
                };
                let name = &rest[open + 1..open + close];
                match self.value(name) {
                    Some(v) => out.push_str(&v),
                    None => continue 'next,
                }
                rest = &rest[open + close + 1..];
            }
            out.push_str(rest);
            return Some(out);
        }
        None
    }

    /// `X-TG-ID`, `X-TG-Username`, `X-TG-Phone`, `X-TG-Name` for the INVITE to the PBX.
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut h = vec![("X-TG-ID".to_string(), self.user_id.to_string())];
        for (name, key) in [
            ("X-TG-Username", "username"),
            ("X-TG-Phone", "phone"),
            ("X-TG-Name", "name_ascii"),
        ] {
            if let Some(v) = self.value(key) {
                h.push((name.to_string(), v));
            }
        }
        h
    }
}

/// The connections of a gateway in hunting order: the lowest priority first; connections
/// with equal priority form one rung.
pub fn rungs<'a>(g: &GatewayConfig, all: &'a [ConnectionConfig]) -> Vec<Vec<&'a ConnectionConfig>> {
    let mut conns: Vec<&ConnectionConfig> = g
        .connections
        .iter()
        .filter_map(|n| all.iter().find(|c| &c.name == n))
        .collect();
    conns.sort_by_key(|c| c.priority);
    let mut out: Vec<Vec<&ConnectionConfig>> = Vec::new();
    for c in conns {
        match out.last_mut() {
            Some(r) if r[0].priority == c.priority => r.push(c),
            _ => out.push(vec![c]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Peer {
        Peer {
            user_id: 7,
            access_hash: 1,
            username: Some("alice".into()),
            phone: Some("79990001122".into()),
            first_name: "Алиса".into(),
            last_name: "Smith".into(),
        }
    }

    #[test]
    fn templates_take_the_first_rule_whose_placeholders_are_known() {
        let p = peer();
        let known = CallerInfo {
            user_id: 7,
            peer: Some(&p),
        };
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            known.render(&t(&["+{phone}", "{userid}"])).as_deref(),
            Some("+79990001122")
        );
        assert_eq!(
            known.render(&t(&["@{username} ({name_ascii})"])).as_deref(),
            Some("@alice (Smith)")
        );
        let bare = CallerInfo {
            user_id: 7,
            peer: None,
        };
        assert_eq!(
            bare.render(&t(&["+{phone}", "0{userid}"])).as_deref(),
            Some("07")
        );
        assert_eq!(bare.render(&t(&["{name}"])), None);
        let h = known.headers();
        assert!(h.contains(&("X-TG-ID".into(), "7".into())));
        assert!(h.contains(&("X-TG-Username".into(), "alice".into())));
        assert!(h.contains(&("X-TG-Phone".into(), "79990001122".into())));
    }

    #[test]
    fn allowed_callers_match_by_id_phone_or_username() {
        let p = peer();
        let mut g: GatewayConfig =
            toml::from_str("name='g'\naccount='a'\nconnections=['c']\nallowed_callers=[]").unwrap();
        assert!(allowed(&g, 7, Some(&p)));
        g.allowed_callers = vec!["@ALICE".into()];
        assert!(allowed(&g, 7, Some(&p)));
        g.allowed_callers = vec!["+79990001122".into()];
        assert!(allowed(&g, 7, Some(&p)));
        g.allowed_callers = vec!["id:7".into()];
        assert!(allowed(&g, 7, None));
        g.allowed_callers = vec!["@bob".into(), "id:8".into()];
        assert!(!allowed(&g, 7, Some(&p)));
    }
}
