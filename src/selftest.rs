//! `siptg demo --self-test`: a built-in SIP phone registers on the demo's PBX line, calls the
//! demo's Telegram user (who answers and echoes) through the gateway, plays a tone and checks it
//! comes back (SIP → G.711 → Opus → Telegram → echo → Opus → G.711 → SIP: audio both ways),
//! sends DTMF digits by SIP INFO and by RFC 4733 and checks the echoed digits come back as DTMF,
//! then hangs up.

use siptg_control::sip::digest;
use siptg_control::sip::msg::{parse_datagram, Method, SipMessage, SipRequest, SipResponse};
use siptg_dataplane::tgmedia::g711::Law;
use siptg_dataplane::tgmedia::opus::{hears_tone, rms, Tone};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

const TONE: f64 = 1000.0;

fn say(step: &str, ok: bool, detail: &str) {
    println!(
        "self-test: {:<28} {}  {detail}",
        step,
        if ok { "ok  " } else { "FAIL" }
    );
}

struct Phone {
    sock: UdpSocket,
    server: SocketAddr,
    local: SocketAddr,
    call_id: String,
    cseq: u32,
    from_tag: String,
}

impl Phone {
    fn request(&mut self, method: Method, uri: &str, to: &str) -> SipRequest {
        self.cseq += 1;
        let mut r = SipRequest::new(method.clone(), uri.to_string());
        let h = r.headers_mut();
        h.add(
            "Via",
            format!(
                "SIP/2.0/UDP {};branch=z9hG4bK{:016x};rport",
                self.local,
                rand::random::<u64>()
            ),
        );
        h.add("Max-Forwards", "70");
        h.add(
            "From",
            format!("<sip:demo@{}>;tag={}", self.server.ip(), self.from_tag),
        );
        h.add("To", to.to_string());
        h.add("Call-ID", self.call_id.clone());
        h.add("CSeq", format!("{} {}", self.cseq, method.as_str()));
        h.add("Contact", format!("<sip:demo@{}>", self.local));
        h.add("User-Agent", "siptg-self-test");
        r
    }

    async fn send(&self, r: &SipRequest) -> Result<(), String> {
        self.sock
            .send_to(&r.to_bytes(), self.server)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// The next SIP message, within `t`.
    async fn recv(&self, t: Duration) -> Result<SipMessage, String> {
        let mut buf = vec![0u8; 65536];
        let (n, _) = tokio::time::timeout(t, self.sock.recv_from(&mut buf))
            .await
            .map_err(|_| "no answer from siptg".to_string())?
            .map_err(|e| e.to_string())?;
        parse_datagram(&buf[..n]).map_err(|e| e.to_string())
    }

    /// The final response to our request with CSeq `cseq` (provisionals are skipped).
    async fn final_response(
        &self,
        cseq: u32,
        t: Duration,
        mut on_request: impl FnMut(&SipRequest),
    ) -> Result<SipResponse, String> {
        let end = Instant::now() + t;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.recv(left).await? {
                SipMessage::Response(r) if r.cseq().map(|c| c.0) == Some(cseq) && r.code >= 200 => {
                    return Ok(r)
                }
                SipMessage::Response(_) => {}
                SipMessage::Request(req) => on_request(&req),
            }
        }
    }
}

/// Runs the self-test against the demo on `server`; true when every step passed.
pub async fn run(server: SocketAddr) -> bool {
    match steps(server).await {
        Ok(()) => {
            println!("self-test: PASSED");
            true
        }
        Err(e) => {
            println!("self-test: FAILED: {e}");
            false
        }
    }
}

async fn steps(server: SocketAddr) -> Result<(), String> {
    let sock = UdpSocket::bind((server.ip(), 0))
        .await
        .map_err(|e| e.to_string())?;
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    let mut phone = Phone {
        sock,
        server,
        local,
        call_id: format!("{:016x}@selftest", rand::random::<u64>()),
        cseq: 0,
        from_tag: format!("{:08x}", rand::random::<u32>()),
    };
    // 1. REGISTER with digest, as a PBX on the demo's line would.
    let reg_uri = format!("sip:{}", server);
    let to = format!("<sip:demo@{}>", server.ip());
    // siptg may still be starting: retry until it answers (up to 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let resp = loop {
        let mut r = phone.request(Method::Register, &reg_uri, &to);
        r.headers_mut().add("Expires", "300");
        phone.send(&r).await?;
        let resp = match phone
            .final_response(phone.cseq, Duration::from_secs(2), |_| {})
            .await
        {
            Ok(resp) if resp.code == 401 => {
                let challenge = resp
                    .header("WWW-Authenticate")
                    .ok_or("401 without a challenge")?
                    .to_string();
                let auth = digest::respond(
                    &challenge,
                    "REGISTER",
                    &reg_uri,
                    "demo",
                    "demo-password",
                    digest::new_cnonce,
                    1,
                )
                .map_err(|e| e.to_string())?;
                let mut r = phone.request(Method::Register, &reg_uri, &to);
                r.headers_mut().add("Expires", "300");
                r.headers_mut().add("Authorization", auth);
                phone.send(&r).await?;
                phone
                    .final_response(phone.cseq, Duration::from_secs(5), |_| {})
                    .await
                    .ok()
            }
            Ok(resp) => Some(resp),
            Err(_) => None,
        };
        match resp {
            Some(r) if r.code != 503 => break r,
            _ if Instant::now() > deadline => {
                return Err("siptg did not answer REGISTER within 30 s".into())
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    say(
        "REGISTER (digest)",
        resp.code == 200,
        &format!("{} {}", resp.code, resp.reason),
    );
    if resp.code != 200 {
        return Err(format!("REGISTER answered {} {}", resp.code, resp.reason));
    }

    // 2. INVITE the demo's Telegram user by phone number.
    let rtp = UdpSocket::bind((server.ip(), 0))
        .await
        .map_err(|e| e.to_string())?;
    let rtp_addr = rtp.local_addr().map_err(|e| e.to_string())?;
    phone.call_id = format!("{:016x}@selftest", rand::random::<u64>());
    let target = format!("sip:+999000000002@{server}");
    let sdp = format!(
        "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=sendrecv\r\n",
        ip = rtp_addr.ip(),
        port = rtp_addr.port()
    );
    // While the Worker starts (its dataplane), calls get 503 Worker is not ready: retry.
    let started = Instant::now();
    let (ok, invite_cseq) = loop {
        let mut inv = phone.request(Method::Invite, &target, &format!("<{target}>"));
        inv.headers_mut().add("Content-Type", "application/sdp");
        inv.body = sdp.clone().into_bytes();
        let invite_cseq = phone.cseq;
        phone.send(&inv).await?;
        let ok = phone
            .final_response(invite_cseq, Duration::from_secs(30), |_| {})
            .await?;
        if ok.code == 503
            && ok.reason == "Worker is not ready"
            && started.elapsed() < Duration::from_secs(20)
        {
            let mut ack = phone.request(Method::Ack, &target, ok.header("To").unwrap_or_default());
            ack.headers_mut().set("CSeq", format!("{invite_cseq} ACK"));
            phone.send(&ack).await?;
            phone.call_id = format!("{:016x}@selftest", rand::random::<u64>());
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        break (ok, invite_cseq);
    };
    say(
        "INVITE +999000000002",
        ok.code == 200,
        &format!(
            "{} {} after {:.1} s",
            ok.code,
            ok.reason,
            started.elapsed().as_secs_f64()
        ),
    );
    if ok.code != 200 {
        return Err(format!("the call was answered {} {}", ok.code, ok.reason));
    }
    let to_hdr = ok.header("To").unwrap_or_default().to_string();
    let contact = ok
        .header("Contact")
        .map(|c| {
            c.trim()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or(c)
                .to_string()
        })
        .unwrap_or(target.clone());
    let body = String::from_utf8_lossy(&ok.body).to_string();
    let port: u16 = body
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .ok_or("no audio port in the answer")?;
    let ip = body
        .lines()
        .find_map(|l| l.strip_prefix("c=IN IP4 "))
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or(server.ip());
    let media = SocketAddr::new(ip, port);
    let mut ack = phone.request(Method::Ack, &contact, &to_hdr);
    ack.headers_mut().set("CSeq", format!("{invite_cseq} ACK"));
    phone.send(&ack).await?;

    // 3. Audio: 4 s of our tone; what comes back must be our tone (echoed by the Telegram user).
    let mut tone = Tone::new(TONE, 8000.0, 8000);
    let (mut seq, mut ts, ssrc) = (0u16, 0u32, rand::random::<u32>());
    let mut heard: Vec<i16> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut buf = [0u8; 2048];
    let end = Instant::now() + Duration::from_secs(4);
    let mut infos: Vec<String> = Vec::new();
    while Instant::now() < end {
        tokio::select! {
            _ = tick.tick() => {
                let mut pcm = [0i16; 160];
                tone.fill(&mut pcm);
                let mut pkt = [0u8; 172];
                pkt[0] = 0x80;
                pkt[1] = 8;
                pkt[2..4].copy_from_slice(&seq.to_be_bytes());
                pkt[4..8].copy_from_slice(&ts.to_be_bytes());
                pkt[8..12].copy_from_slice(&ssrc.to_be_bytes());
                Law::A.encode(&pcm, &mut pkt[12..]);
                let _ = rtp.send_to(&pkt, media).await;
                seq = seq.wrapping_add(1);
                ts = ts.wrapping_add(160);
            }
            got = rtp.recv_from(&mut buf) => {
                if let Ok((n, _)) = got {
                    if n > 12 && buf[1] & 0x7f == 8 {
                        let mut pcm = vec![0i16; n - 12];
                        Law::A.decode(&buf[12..n], &mut pcm);
                        heard.extend_from_slice(&pcm);
                    }
                }
            }
            msg = phone.recv(Duration::from_secs(5)) => {
                if let Ok(SipMessage::Request(req)) = msg {
                    answer_in_dialog(&phone, &req, &mut infos).await;
                }
            }
        }
    }
    let tail = &heard[heard.len().saturating_sub(8000)..];
    let echo_ok = hears_tone(tail, 8000, TONE, 440.0);
    say(
        "audio both ways (echo)",
        echo_ok,
        &format!(
            "{} samples back, rms {:.0} at {TONE} Hz",
            heard.len(),
            rms(tail)
        ),
    );

    // 4. DTMF: 5 by INFO and 7 by RFC 4733 go to the Telegram user as keypad messages; the
    //    user types them back and they must come back to us as DTMF (by the connection's
    //    first method: RFC 4733 events in the RTP, as negotiated, or INFO).
    let mut info = phone.request(Method::Info, &contact, &to_hdr);
    info.headers_mut()
        .add("Content-Type", "application/dtmf-relay");
    info.body = b"Signal=5\r\nDuration=160\r\n".to_vec();
    let info_cseq = phone.cseq;
    phone.send(&info).await?;
    // Digit 7 as telephone-events (payload type 101), continuing our RTP stream.
    for (i, end) in [false, false, false, false, false, true, true, true]
        .into_iter()
        .enumerate()
    {
        let duration = (160 * (i as u16 + 1)).min(800);
        let mut pkt = [0u8; 16];
        pkt[0] = 0x80;
        pkt[1] = 101 | if i == 0 { 0x80 } else { 0 };
        pkt[2..4].copy_from_slice(&seq.to_be_bytes());
        pkt[4..8].copy_from_slice(&ts.to_be_bytes());
        pkt[8..12].copy_from_slice(&ssrc.to_be_bytes());
        pkt[12] = 7;
        pkt[13] = if end { 0x80 | 10 } else { 10 };
        pkt[14..16].copy_from_slice(&duration.to_be_bytes());
        let _ = rtp.send_to(&pkt, media).await;
        seq = seq.wrapping_add(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut info_answered = false;
    let mut events: Vec<String> = Vec::new();
    let mut last_event_ts = None;
    let back = |infos: &Vec<String>, events: &Vec<String>, d: &str| {
        infos.iter().chain(events.iter()).any(|x| x == d)
    };
    while Instant::now() < deadline
        && !(info_answered && back(&infos, &events, "5") && back(&infos, &events, "7"))
    {
        tokio::select! {
            msg = phone.recv(deadline.saturating_duration_since(Instant::now())) => match msg {
                Ok(SipMessage::Response(r)) if r.cseq().map(|c| c.0) == Some(info_cseq) => {
                    info_answered = r.code == 200
                }
                Ok(SipMessage::Request(req)) => answer_in_dialog(&phone, &req, &mut infos).await,
                Ok(_) => {}
                Err(_) => break,
            },
            got = rtp.recv_from(&mut buf) => {
                // An RFC 4733 event's end packet (sent three times: counted once per timestamp).
                if let Ok((n, _)) = got {
                    if n >= 16 && buf[1] & 0x7f == 101 && buf[13] & 0x80 != 0 {
                        let ets = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                        if last_event_ts != Some(ets) {
                            last_event_ts = Some(ets);
                            let d = match buf[12] { 0..=9 => (b'0' + buf[12]) as char, 10 => '*', 11 => '#', c => (b'A' + c - 12) as char };
                            events.push(d.to_string());
                        }
                    }
                }
            }
        }
    }
    let dtmf_ok = info_answered && back(&infos, &events, "5") && back(&infos, &events, "7");
    say(
        "DTMF both ways",
        dtmf_ok,
        &format!(
            "sent 5 by INFO, 7 by RFC 4733; back from Telegram by INFO {infos:?}, by RFC 4733 {events:?}"
        ),
    );

    // 5. Hang up.
    let bye = phone.request(Method::Bye, &contact, &to_hdr);
    let bye_cseq = phone.cseq;
    phone.send(&bye).await?;
    let r = phone
        .final_response(bye_cseq, Duration::from_secs(5), |_| {})
        .await?;
    say("BYE", r.code == 200, &format!("{} {}", r.code, r.reason));
    if echo_ok && dtmf_ok && r.code == 200 {
        Ok(())
    } else {
        Err("see the steps above".into())
    }
}

/// Answers an in-dialog request from the gateway (INFO with DTMF: noted) with 200.
async fn answer_in_dialog(phone: &Phone, req: &SipRequest, infos: &mut Vec<String>) {
    if req.method == Method::Info {
        if let Some(d) = siptg_control::gateway::sipleg::info_digit(req) {
            infos.push(d.to_string());
        }
    }
    let resp = SipResponse::to(req, 200, "OK", None);
    let _ = phone.sock.send_to(&resp.to_bytes(), phone.server).await;
}
