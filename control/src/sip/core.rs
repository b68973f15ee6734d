//! The Worker's SIP core on one UDP socket (and, for the first core, the TCP connections): the
//! transaction layer, the B2BUA's calls, and the bridge to the Manager (routing) and the
//! dataplane (media). One tokio task per UDP listener (or one without UDP when only TCP).
//!
//! Everything protocol-shaped is sans-IO ([`super::transaction`], [`super::call`]); this task
//! only moves bytes, runs the asynchronous steps (asking the Manager, creating media legs) in
//! spawned tasks whose results come back on a channel, and feeds timers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use siptg_proto::SessionId;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::call::{Call, CallAction, CallConfig, Side, Target};
use super::edge::{connect_tcp, Reply, Responder, TcpEvent, TcpWriter};
use super::msg::{parse_datagram, Headers, Method, SipRequest, SipResponse};
use super::sdp::CodecPrefs;
use super::transaction::{
    ClientKey, ServerKey, TimerConfig, TransactionLayer, Transport, TxEvent, TxKey,
};
use crate::dataplane::{latching_leg, DataplaneClient};
use crate::gateway::runtime::{GatewayCalls, GwMsg};
use crate::link::Response as LinkResponse;
use crate::worker::Worker;

/// The `Server` header value (the configured user agent), set once at start.
static SERVER: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Stamps our `Server` header on a response we originate.
fn stamped(mut resp: SipResponse) -> SipResponse {
    if resp.header("Server").is_none() {
        resp.headers_mut().add(
            "Server",
            SERVER.get().map(String::as_str).unwrap_or("siptg"),
        );
    }
    resp
}

/// What a spawned step reports back to the core. Sizes differ, but these travel once per
/// request through a channel, not on a hot path.
#[allow(clippy::large_enum_variant)]
enum Done {
    /// A non-INVITE request (or a refused INVITE) is answered.
    Answer { key: ServerKey, resp: SipResponse },
    /// An INVITE may proceed: its media session and legs exist.
    CallReady {
        key: ServerKey,
        req: SipRequest,
        source: SocketAddr,
        transport: Transport,
        /// The calling connection's codec preferences.
        prefs: CodecPrefs,
        target: Target,
        session: SessionId,
        legs: [(u32, SocketAddr); 2],
    },
    /// An INVITE to Telegram: its media session and SIP leg exist.
    GatewayReady {
        key: ServerKey,
        req: SipRequest,
        source: SocketAddr,
        transport: Transport,
        route: Box<crate::link::GatewayRoute>,
        session: SessionId,
        leg: (u32, SocketAddr),
    },
}

struct CallEntry {
    call: Call,
    invite: ServerKey,
    session: SessionId,
    legs: [u32; 2],
    /// How each side (A, B) is reached.
    transport: [Transport; 2],
    /// Server transactions of in-dialog requests, by side and CSeq method, awaiting answers.
    pending: Vec<(Side, Method, ServerKey)>,
}

/// The TCP side of a core: the channel every connection reports on (the sender opens
/// outbound connections) and its receiving end.
pub type TcpChannel = (mpsc::Sender<TcpEvent>, mpsc::Receiver<TcpEvent>);

/// Rewrites the top Via's transport token (`TCP`, `TLS`) and marks our Contact
/// `;transport=tcp` or `;transport=tls`, for a message that goes out on a connection (the calls
/// build them for UDP). Nothing changes for UDP.
fn for_transport(h: &mut Headers, via: bool, transport: Transport) {
    if !transport.is_reliable() {
        return;
    }
    let token = transport.via_token();
    if via {
        if let Some(mut v) = h.top_via() {
            if v.transport.eq_ignore_ascii_case("UDP") {
                v.transport = token.into();
                h.replace_top_via(v.to_string());
            }
        }
    }
    if let Some(c) = h.get("Contact") {
        if let Some(inner) = c.strip_suffix('>') {
            if !c.to_ascii_lowercase().contains("transport=") && c.contains("@") {
                let c = format!("{inner};transport={}>", token.to_ascii_lowercase());
                h.set("Contact", c);
            }
        }
    }
}

/// Readies a request we originate for the connection it leaves on: the transport in the top
/// Via and our Contact (see [`for_transport`]) and, for a connection the peer opened to one of
/// our listeners (`local`), that listener in place of `ours` (the UDP address the request was
/// built with) as sent-by and Contact: a PBX registered over TCP or TLS sends its BYE there.
pub(crate) fn for_connection(
    h: &mut Headers,
    transport: Transport,
    local: Option<SocketAddr>,
    ours: SocketAddr,
) {
    for_transport(h, true, transport);
    let Some(local) = local.filter(|l| *l != ours && transport.is_reliable()) else {
        return;
    };
    if let Some(mut v) = h.top_via() {
        v.host = match local.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        v.port = Some(local.port());
        h.replace_top_via(v.to_string());
    }
    if let Some(c) = h.get("Contact") {
        let c = c.replace(&format!("@{ours}"), &format!("@{local}"));
        h.set("Contact", c);
    }
}

/// Runs the SIP core on `sock` (and the TCP connections of `tcp`) until the process ends.
pub async fn serve(
    sock: Option<Arc<UdpSocket>>,
    tcp: Option<(TcpChannel, SocketAddr)>,
    worker: Arc<Worker>,
    server: String,
    call_config: CallConfig,
) {
    let udp_local = sock.as_ref().and_then(|s| s.local_addr().ok());
    let Some(local) = udp_local.or(tcp.as_ref().map(|t| t.1)) else {
        return;
    };
    let (tcp_events, mut tcp_rx) = match tcp {
        Some(((t, r), _)) => (Some(t), Some(r)),
        None => (None, None),
    };
    // Connected peers (TCP, TLS): their connection's writer, our address on it, its transport.
    let mut conns: HashMap<SocketAddr, (TcpWriter, SocketAddr, Transport)> = HashMap::new();
    let mut tx = TransactionLayer::new(TimerConfig::default());
    tx.set_server_header(Some(server.clone()));
    let _ = SERVER.set(server.clone());
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(1024);
    let mut calls: HashMap<u64, CallEntry> = HashMap::new();
    let mut by_call_id: HashMap<String, (u64, Side)> = HashMap::new();
    let mut by_client: HashMap<ClientKey, (u64, Side)> = HashMap::new();
    let mut next_call = 1u64;
    let mut buf = vec![0u8; 65_535];
    // Gateway calls (SIP ⇄ Telegram) run on the first core that registers for them.
    let (gw_tx, mut gw_rx) = mpsc::channel::<GwMsg>(4096);
    let mut gw = GatewayCalls::new(worker.clone(), gw_tx.clone(), local);
    if worker.set_gateway_channel(gw_tx.clone()) {
        tokio::spawn(forward_dataplane_events(
            worker.dataplane().events(),
            gw_tx.clone(),
        ));
    }
    loop {
        let calls_due = calls
            .values()
            .filter_map(|e| e.call.poll_timeout())
            .chain(gw.poll_timeout())
            .min();
        let due = match (tx.poll_timeout(), calls_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = match due {
            Some(t) => tokio::time::sleep_until(t.into()),
            None => tokio::time::sleep(std::time::Duration::from_secs(1)),
        };
        tokio::select! {
            got = async {
                match &sock {
                    Some(s) => s.recv_from(&mut buf).await,
                    None => std::future::pending().await,
                }
            } => {
                let Ok((n, source)) = got else { continue };
                let data = &buf[..n];
                if data.iter().all(|b| b.is_ascii_whitespace()) {
                    continue; // keepalive CRLFs (RFC 5626)
                }
                match parse_datagram(data) {
                    Ok(msg) => tx.on_message(Instant::now(), msg, source, Transport::Udp),
                    Err(e) => {
                        tracing::debug!(%source, error = %e, "unparseable SIP datagram dropped");
                        worker.metrics().inc("siptg_sip_malformed_total", &[]);
                    }
                }
            }
            Some(ev) = async {
                match tcp_rx.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                match ev {
                    TcpEvent::Message { msg, peer, local, writer, transport } => {
                        conns.insert(peer, (writer, local, transport));
                        gw.connection_up(peer, transport, local);
                        tx.on_message(Instant::now(), msg, peer, transport);
                    }
                    TcpEvent::Closed { peer, writer, failed, transport } => {
                        // Only this connection's entry: a newer one to the same peer stays.
                        if conns.get(&peer).is_some_and(|(w, _, _)| w.same_channel(&writer)) {
                            conns.remove(&peer);
                            gw.connection_down(peer);
                        }
                        if failed {
                            tx.on_transport_error(peer, transport);
                        }
                    }
                }
            }
            Some(m) = gw_rx.recv() => {
                gw.on_msg(m);
            }
            Some(done) = done_rx.recv() => {
                let now = Instant::now();
                match done {
                    Done::GatewayReady { key, req, source, transport, route, session, leg } => {
                        gw.start_outgoing(&mut tx, key, req, source, transport, *route, session, leg);
                    }
                    Done::Answer { key, resp } => {
                        let _ = tx.respond(now, &key, stamped(resp));
                    }
                    Done::CallReady { key, req, source, transport, prefs, target, session, legs } => {
                        // The callee is reached over its connection to us when it has one (it
                        // registered over TCP or TLS), else over what its Contact says (TLS
                        // only works over a connection it opened: we do not dial TLS).
                        let contact = target.contact.to_ascii_lowercase();
                        let b_transport = match conns.get(&target.address) {
                            Some(c) if tcp_events.is_some() => c.2,
                            _ if tcp_events.is_some() && contact.contains("transport=tls") => Transport::Tls,
                            _ if tcp_events.is_some() && contact.contains("transport=tcp") => Transport::Tcp,
                            _ => Transport::Udp,
                        };
                        let here = match transport {
                            Transport::Udp => local,
                            _ => conns.get(&source).map(|c| c.1).unwrap_or(local),
                        };
                        match Call::start(req.clone(), source, &target, &prefs, legs[0].1, legs[1].1, here, &call_config) {
                            Ok(call) => {
                                let id = next_call;
                                next_call += 1;
                                let (a_id, b_id) = call.call_ids();
                                by_call_id.insert(a_id.to_string(), (id, Side::A));
                                by_call_id.insert(b_id.to_string(), (id, Side::B));
                                calls.insert(id, CallEntry { call, invite: key, session, legs: [legs[0].0, legs[1].0], transport: [transport, b_transport], pending: Vec::new() });
                            }
                            Err(refusal) => {
                                let mut resp = SipResponse::to(&req, refusal.code, &refusal.reason, Some(&tag()));
                                for (n, v) in refusal.headers {
                                    resp.headers_mut().add(&n, v);
                                }
                                let _ = tx.respond(now, &key, stamped(resp));
                                delete_session(&worker, session);
                            }
                        }
                    }
                }
            }
            _ = sleep => {
                let now = Instant::now();
                tx.handle_timeout(now);
                gw.handle_timeout(now);
                for e in calls.values_mut() {
                    if e.call.poll_timeout().is_some_and(|t| t <= now) {
                        e.call.handle_timeout(now);
                    }
                }
            }
        }
        // Events from the transaction layer.
        while let Some(ev) = tx.poll_event() {
            let now = Instant::now();
            match ev {
                TxEvent::Request {
                    key,
                    req,
                    source,
                    transport,
                } => {
                    worker.metrics().inc(
                        "siptg_sip_requests_total",
                        &[("method", super::edge::method_label(req.method.as_str()))],
                    );
                    let in_dialog = req.to_tag().is_some();
                    if req.call_id().is_some_and(|c| gw.owns_call_id(c)) {
                        gw.on_request(Some(key), req);
                    } else if let Some(&(id, side)) = req.call_id().and_then(|c| by_call_id.get(c))
                    {
                        if let Some(e) = calls.get_mut(&id) {
                            if req.method == Method::Invite {
                                let direction = String::from_utf8_lossy(&req.body)
                                    .lines()
                                    .find_map(|l| {
                                        let l = l.trim();
                                        ["a=sendonly", "a=recvonly", "a=inactive", "a=sendrecv"]
                                            .contains(&l)
                                            .then(|| l[2..].to_string())
                                    })
                                    .unwrap_or_else(|| "sendrecv".into());
                                tracing::info!(session = e.session, ?side, %direction, "re-INVITE");
                            }
                            e.pending.push((side, req.method.clone(), key));
                            e.call.on_request(now, side, req);
                        }
                    } else if in_dialog {
                        let resp =
                            SipResponse::to(&req, 481, "Call/Transaction Does Not Exist", None);
                        let _ = tx.respond(now, &key, resp);
                    } else if let Some(unsupported) = unsupported_requirements(&req) {
                        // RFC 3261 §8.2.2.3: extensions we do not implement are refused.
                        let mut resp = SipResponse::to(&req, 420, "Bad Extension", Some(&tag()));
                        resp.headers_mut().add("Unsupported", unsupported);
                        let _ = tx.respond(now, &key, stamped(resp));
                    } else if req.method == Method::Message {
                        tokio::spawn(route_message(
                            worker.clone(),
                            key,
                            req,
                            source,
                            done_tx.clone(),
                        ));
                    } else if req.method == Method::Invite {
                        tokio::spawn(route_invite(
                            worker.clone(),
                            key,
                            req,
                            source,
                            transport,
                            done_tx.clone(),
                        ));
                    } else {
                        tokio::spawn(answer_plain(
                            worker.clone(),
                            key,
                            req,
                            source,
                            done_tx.clone(),
                        ));
                    }
                }
                TxEvent::Ack { req, .. } if req.call_id().is_some_and(|c| gw.owns_call_id(c)) => {
                    gw.on_request(None, req);
                }
                TxEvent::Cancel { req, .. }
                    if req.call_id().is_some_and(|c| gw.owns_call_id(c)) =>
                {
                    gw.on_request(None, req);
                }
                TxEvent::Response { key, resp, .. } if gw.owns_client(&key) => {
                    gw.on_response(&key, resp);
                }
                TxEvent::Timeout {
                    key: TxKey::Client(k),
                }
                | TxEvent::TransportError {
                    key: TxKey::Client(k),
                } if gw.owns_client(&k) => {
                    gw.on_client_timeout(&k);
                }
                TxEvent::Ack { req, .. } => {
                    if let Some(&(id, side)) = req.call_id().and_then(|c| by_call_id.get(c)) {
                        if let Some(e) = calls.get_mut(&id) {
                            e.call.on_request(now, side, req);
                        }
                    }
                }
                TxEvent::Cancel { req, .. } => {
                    // The layer already answered the CANCEL; the call answers the INVITE 487.
                    if let Some(&(id, side)) = req.call_id().and_then(|c| by_call_id.get(c)) {
                        if let Some(e) = calls.get_mut(&id) {
                            e.call.on_request(now, side, req);
                        }
                    }
                }
                TxEvent::Response { key, resp, .. } => {
                    if let Some(&(id, side)) = by_client.get(&key) {
                        if let Some(e) = calls.get_mut(&id) {
                            e.call.on_response(now, side, resp);
                        }
                    }
                }
                TxEvent::Timeout { key } | TxEvent::TransportError { key } => {
                    if let TxKey::Client(k) = &key {
                        if let Some(&(id, side)) = by_client.get(k) {
                            if let Some(e) = calls.get_mut(&id) {
                                // As if the peer answered 408 (RFC 3261 §8.1.3.1).
                                if k.method == Method::Invite {
                                    let mut resp = SipResponse::new(408, "Request Timeout");
                                    resp.headers_mut().add("CSeq", "1 INVITE");
                                    resp.headers_mut()
                                        .add("Call-ID", e.call.call_ids().1.to_string());
                                    e.call.on_response(now, side, resp);
                                }
                            }
                        }
                        by_client.remove(k);
                    }
                }
            }
        }
        // Actions of the gateway calls, then of the B2BUA calls.
        gw.drive(&mut tx);
        let now = Instant::now();
        let mut ended = Vec::new();
        for (&id, e) in calls.iter_mut() {
            while let Some(action) = e.call.poll_action() {
                match action {
                    CallAction::RespondInvite(mut resp) => {
                        for_transport(resp.headers_mut(), false, e.transport[0]);
                        let _ = tx.respond(now, &e.invite, stamped(resp));
                    }
                    CallAction::Respond { side, mut resp } => {
                        for_transport(resp.headers_mut(), false, e.transport[side_index(side)]);
                        let method = resp.cseq().map(|c| c.1);
                        if method == Some(Method::Cancel) {
                            continue; // answered by the transaction layer already
                        }
                        if let Some(i) = e
                            .pending
                            .iter()
                            .position(|(s, m, _)| *s == side && Some(m) == method.as_ref())
                        {
                            let (_, _, key) = e.pending.remove(i);
                            let _ = tx.respond(now, &key, stamped(resp));
                        }
                    }
                    CallAction::Send {
                        side,
                        mut req,
                        dest,
                    } => {
                        let transport = e.transport[side_index(side)];
                        for_transport(req.headers_mut(), true, transport);
                        let result = if req.method == Method::Cancel {
                            let invite = by_client
                                .iter()
                                .find(|(k, (cid, s))| {
                                    *cid == id && *s == side && k.method == Method::Invite
                                })
                                .map(|(k, _)| k.clone());
                            match invite {
                                Some(k) => tx.cancel(now, &k),
                                None => continue,
                            }
                        } else {
                            tx.send_request(now, req, dest, transport)
                        };
                        if let Ok(k) = result {
                            by_client.insert(k, (id, side));
                        }
                    }
                    CallAction::SendAck {
                        mut req,
                        dest,
                        side,
                    } => {
                        let transport = e.transport[side_index(side)];
                        for_transport(req.headers_mut(), true, transport);
                        tx.send_stateless(dest, transport, req);
                    }
                    CallAction::UpdateLeg { side, spec } => {
                        let leg = e.legs[side_index(side)];
                        let session = e.session;
                        if let Some(dp) = worker.dataplane().client() {
                            tokio::spawn(async move {
                                if let Err(err) = dp.update_leg(session, leg, spec).await {
                                    tracing::warn!(session, leg, error = %err, "media leg update refused");
                                }
                            });
                        }
                    }
                    CallAction::Ended { reason } => {
                        tracing::info!(session = e.session, %reason, "call ended");
                        ended.push(id);
                    }
                }
            }
        }
        for id in ended {
            if let Some(e) = calls.remove(&id) {
                by_call_id.retain(|_, (cid, _)| *cid != id);
                by_client.retain(|_, (cid, _)| *cid != id);
                delete_session(&worker, e.session);
            }
        }
        while let Some((dest, transport, bytes)) = tx.poll_transmit() {
            match transport {
                Transport::Udp => {
                    let Some(sock) = &sock else {
                        tx.on_transport_error(dest, Transport::Udp);
                        continue;
                    };
                    if let Err(e) = sock.send_to(&bytes, dest).await {
                        tracing::debug!(%dest, error = %e, "SIP send failed");
                        tx.on_transport_error(dest, Transport::Udp);
                    }
                }
                Transport::Tcp => {
                    if !send_tcp(&mut conns, tcp_events.as_ref(), dest, bytes, local) {
                        tx.on_transport_error(dest, Transport::Tcp);
                    }
                }
                Transport::Tls => {
                    // Only over a connection the peer opened: calls do not dial TLS (only registrations do).
                    let sent = conns
                        .get(&dest)
                        .is_some_and(|(w, _, t)| *t == Transport::Tls && w.try_send(bytes).is_ok());
                    if !sent {
                        tracing::debug!(%dest, "no SIP TLS connection to the peer");
                        tx.on_transport_error(dest, Transport::Tls);
                    }
                }
            }
        }
    }
}

/// Forwards the dataplane's events to the gateway calls (Telegram media, RTP timeouts, DTMF),
/// across the dataplane's reconnects and restarts (the supervisor's subscription, taken before
/// any call exists: a first call right after the dataplane connects misses none of them).
async fn forward_dataplane_events(
    mut events: tokio::sync::broadcast::Receiver<siptg_proto::Event>,
    tx: mpsc::Sender<GwMsg>,
) {
    loop {
        match events.recv().await {
            Ok(
                ev @ (siptg_proto::Event::Telegram { .. }
                | siptg_proto::Event::RtpTimeout { .. }
                | siptg_proto::Event::Dtmf { .. }),
            ) => {
                if tx.send(GwMsg::Dataplane(ev)).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "dataplane events lost for the gateway calls");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn side_index(side: Side) -> usize {
    match side {
        Side::A => 0,
        Side::B => 1,
    }
}

/// Queues `bytes` on the connection to `dest`, opening one when there is none (the connect
/// runs in its own task; a failure comes back as a failed `Closed`). False when it cannot be
/// sent at all.
fn send_tcp(
    conns: &mut HashMap<SocketAddr, (TcpWriter, SocketAddr, Transport)>,
    events: Option<&mpsc::Sender<TcpEvent>>,
    dest: SocketAddr,
    bytes: Vec<u8>,
    local: SocketAddr,
) -> bool {
    let bytes = match conns.get(&dest) {
        Some((w, _, _)) => match w.try_send(bytes) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(%dest, "SIP TCP connection backlogged; message dropped");
                return false;
            }
            // The connection ended: open a new one.
            Err(mpsc::error::TrySendError::Closed(b)) => b,
        },
        None => bytes,
    };
    let Some(events) = events else { return false };
    let (writer, queue) = mpsc::channel(256);
    if writer.try_send(bytes).is_err() {
        return false;
    }
    conns.insert(dest, (writer.clone(), local, Transport::Tcp));
    tokio::spawn(connect_tcp(dest, writer, queue, events.clone()));
    true
}

/// The `Require` options of a request that we do not implement: everything but `100rel`
/// (RFC 3262) and `timer` (RFC 4028), which the calls implement. A UA that requires anything
/// else is told so instead of being half-served.
fn unsupported_requirements(req: &SipRequest) -> Option<String> {
    let options: Vec<&str> = req
        .headers()
        .get_all("Require")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|o| {
            !o.is_empty() && !o.eq_ignore_ascii_case("100rel") && !o.eq_ignore_ascii_case("timer")
        })
        .collect();
    (!options.is_empty()).then(|| options.join(", "))
}

/// A connection's codec list as negotiation preferences (telephone-event always offered);
/// SIP.TG's default order when the list is empty or names nothing usable.
fn codec_prefs(names: &[String]) -> CodecPrefs {
    let codecs: Vec<super::sdp::AudioCodec> = names
        .iter()
        .filter_map(|n| super::sdp::AudioCodec::from_name(n))
        .collect();
    CodecPrefs::new(codecs, true).unwrap_or_default()
}

fn tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn delete_session(worker: &Arc<Worker>, session: SessionId) {
    if let Some(dp) = worker.dataplane().client() {
        tokio::spawn(async move {
            let _ = dp.delete_session(session).await;
        });
    }
}

/// The old request reader's view of a request, for the Worker's routing decisions.
fn legacy(req: &SipRequest) -> super::message::Request {
    super::message::Request::from_msg(req)
}

fn response_for(req: &SipRequest, reply: Reply) -> SipResponse {
    let mut resp = SipResponse::to(req, reply.code, &reply.reason, Some(&tag()));
    resp.headers_mut().add(
        "Server",
        SERVER.get().map(String::as_str).unwrap_or("siptg"),
    );
    for (n, v) in reply.headers {
        resp.headers_mut().add(&n, v);
    }
    if req.method == Method::Options && reply.code == 200 {
        resp.headers_mut().add(
            "Allow",
            "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, INFO, UPDATE, PRACK, MESSAGE",
        );
        resp.headers_mut().add("Supported", super::call::SUPPORTED);
    }
    resp
}

/// REGISTER, OPTIONS, …: the Worker's answer (bans, Manager) through the transaction.
async fn answer_plain(
    worker: Arc<Worker>,
    key: ServerKey,
    req: SipRequest,
    source: SocketAddr,
    done: mpsc::Sender<Done>,
) {
    let old = legacy(&req);
    if let Some(reply) = worker.answer(old, source).await {
        let _ = done
            .send(Done::Answer {
                key,
                resp: response_for(&req, reply),
            })
            .await;
    }
}

/// A `MESSAGE` outside a dialog: the Manager authenticates its connection and routes it like
/// an INVITE; a gateway's text goes to the Telegram user it names (`200 OK` once Telegram took
/// it). Bodies other than plain text get `415` with `Accept: text/plain`, empty ones `400`.
async fn route_message(
    worker: Arc<Worker>,
    key: ServerKey,
    req: SipRequest,
    source: SocketAddr,
    done: mpsc::Sender<Done>,
) {
    let old = legacy(&req);
    let Some(decision) = worker.decide(&old, source).await else {
        return; // banned: no answer at all
    };
    let reply = match decision {
        LinkResponse::Gateway(route) => {
            match crate::gateway::messages::text_of(req.header("Content-Type"), &req.body) {
                Ok(text) => {
                    let (code, reason) =
                        crate::gateway::runtime::message_to_telegram(&worker, &route, &text).await;
                    Reply::new(code, reason)
                }
                Err(e) => {
                    tracing::info!(gateway = %route.gateway, %source, error = %e, "MESSAGE body refused");
                    let (code, reason, headers) = e.response();
                    Reply {
                        code,
                        reason: reason.to_string(),
                        headers,
                    }
                }
            }
        }
        LinkResponse::Route {
            code,
            reason,
            headers,
        } => Reply {
            code,
            reason,
            headers,
        },
        other => {
            tracing::warn!(?other, "Manager answered a MESSAGE with something else");
            Reply::new(503, super::reasons::NO_RESPONSE_FROM_MANAGER)
        }
    };
    worker.metrics().inc(
        "siptg_gateway_messages_total",
        &[
            ("direction", "to_telegram"),
            ("code", &reply.code.to_string()),
        ],
    );
    let _ = done
        .send(Done::Answer {
            key,
            resp: response_for(&req, reply),
        })
        .await;
}

/// An initial INVITE: ask the Manager; a forward gets a media session with two legs first.
async fn route_invite(
    worker: Arc<Worker>,
    key: ServerKey,
    req: SipRequest,
    source: SocketAddr,
    transport: Transport,
    done: mpsc::Sender<Done>,
) {
    let old = legacy(&req);
    let decision = worker.decide(&old, source).await;
    let answer = |reply: Reply| Done::Answer {
        key: key.clone(),
        resp: response_for(&req, reply),
    };
    let Some(decision) = decision else { return };
    if let LinkResponse::Gateway(route) = decision {
        let Some(dp) = worker.dataplane().client() else {
            let _ = done
                .send(answer(Reply::new(503, super::reasons::WORKER_NOT_READY)))
                .await;
            return;
        };
        let made = async {
            let session = dp.create_session(req.call_id().unwrap_or("gw")).await?;
            let leg = dp
                .add_leg(session, latching_leg(siptg_proto::Codec::pcma(), None))
                .await?;
            Ok::<_, crate::dataplane::DpError>((session, (leg.leg, leg.local)))
        }
        .await;
        let msg = match made {
            Ok((session, leg)) => Done::GatewayReady {
                key,
                req,
                source,
                transport,
                route,
                session,
                leg,
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a gateway call's media");
                answer(Reply::new(503, super::reasons::WORKER_NOT_READY))
            }
        };
        let _ = done.send(msg).await;
        return;
    }
    let (contact, address, codecs) = match decision {
        LinkResponse::Forward {
            contact,
            address,
            codecs,
            ..
        } => (contact, address, codecs),
        LinkResponse::Route {
            code,
            reason,
            headers,
        } => {
            let _ = done
                .send(answer(Reply {
                    code,
                    reason,
                    headers,
                }))
                .await;
            return;
        }
        _ => {
            let _ = done
                .send(answer(Reply::new(
                    503,
                    super::reasons::NO_RESPONSE_FROM_MANAGER,
                )))
                .await;
            return;
        }
    };
    let Some(dp) = worker.dataplane().client() else {
        let _ = done
            .send(answer(Reply::new(503, "Worker is not ready")))
            .await;
        return;
    };
    match media(&dp, req.call_id().unwrap_or("call")).await {
        Ok((session, legs)) => {
            let _ = done
                .send(Done::CallReady {
                    key,
                    req,
                    source,
                    transport,
                    prefs: codec_prefs(&codecs),
                    target: Target { contact, address },
                    session,
                    legs,
                })
                .await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot create the call's media");
            let _ = done
                .send(answer(Reply::new(503, "Worker is not ready")))
                .await;
        }
    }
}

async fn media(
    dp: &DataplaneClient,
    tag: &str,
) -> Result<(SessionId, [(u32, SocketAddr); 2]), crate::dataplane::DpError> {
    let session = dp.create_session(&format!("sip:{tag}")).await?;
    let a = dp
        .add_leg(session, latching_leg(siptg_proto::Codec::pcma(), None))
        .await?;
    let b = dp
        .add_leg(session, latching_leg(siptg_proto::Codec::pcma(), None))
        .await?;
    dp.bridge(session, a.leg, b.leg).await?;
    Ok((session, [(a.leg, a.local), (b.leg, b.local)]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::msg::SipMessage;

    /// Requests going out on TCP say so in the top Via and in our Contact; the rest stays.
    #[test]
    fn tcp_rewrite_sets_via_token_and_contact_transport() {
        let raw = "BYE sip:bob@127.0.0.1:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx;rport\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKy\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:bob@127.0.0.1>;tag=2\r\n\
Call-ID: c\r\nCSeq: 2 BYE\r\nContact: <sip:siptg@127.0.0.1:5060>\r\nContent-Length: 0\r\n\r\n";
        let Ok(SipMessage::Request(mut req)) = parse_datagram(raw.as_bytes()) else {
            panic!("test request does not parse");
        };
        for_transport(req.headers_mut(), true, Transport::Tcp);
        let vias: Vec<_> = req.headers().get_all("Via").collect();
        assert!(
            vias[0].starts_with("SIP/2.0/TCP 127.0.0.1:5060"),
            "{vias:?}"
        );
        assert!(vias[0].contains("branch=z9hG4bKx"), "{vias:?}");
        assert!(
            vias.iter().any(|v| v.contains("SIP/2.0/UDP 10.0.0.1")),
            "{vias:?}"
        );
        assert_eq!(
            req.header("Contact"),
            Some("<sip:siptg@127.0.0.1:5060;transport=tcp>")
        );
        // Idempotent.
        for_transport(req.headers_mut(), true, Transport::Tcp);
        assert_eq!(
            req.header("Contact"),
            Some("<sip:siptg@127.0.0.1:5060;transport=tcp>")
        );
    }

    /// A request for a PBX's own TLS connection to our listener names that listener (not the
    /// UDP address it was built with) in its Via and Contact; UDP leaves it alone.
    #[test]
    fn requests_over_a_pbx_connection_name_the_listener() {
        let raw = "INVITE sip:100@127.0.0.1:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx;rport\r\n\
From: <sip:alice@127.0.0.1:5060>;tag=1\r\nTo: <sip:100@127.0.0.1>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:siptg@127.0.0.1:5060>\r\nContent-Length: 0\r\n\r\n";
        let Ok(SipMessage::Request(req)) = parse_datagram(raw.as_bytes()) else {
            panic!("test request does not parse");
        };
        let ours: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        let listener: SocketAddr = "127.0.0.1:5061".parse().unwrap();
        let mut tls = req.clone();
        for_connection(tls.headers_mut(), Transport::Tls, Some(listener), ours);
        let via = tls.headers().get_all("Via").next().unwrap_or_default();
        assert!(via.starts_with("SIP/2.0/TLS 127.0.0.1:5061;"), "{via}");
        assert!(via.contains("branch=z9hG4bKx"), "{via}");
        assert_eq!(
            tls.header("Contact"),
            Some("<sip:siptg@127.0.0.1:5061;transport=tls>")
        );
        // The From URI is not ours to move.
        assert_eq!(tls.header("From"), Some("<sip:alice@127.0.0.1:5060>;tag=1"));
        let mut udp = req.clone();
        for_connection(udp.headers_mut(), Transport::Udp, None, ours);
        assert_eq!(udp.to_bytes(), req.to_bytes());
    }

    /// TLS: `SIP/2.0/TLS` and `;transport=tls`; UDP leaves the message alone.
    #[test]
    fn tls_rewrite_sets_via_token_and_contact_transport() {
        let raw = "BYE sip:bob@127.0.0.1:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx\r\n\
From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:bob@127.0.0.1>;tag=2\r\nCall-ID: c\r\nCSeq: 2 BYE\r\n\
Contact: <sip:siptg@127.0.0.1:5061>\r\nContent-Length: 0\r\n\r\n";
        let Ok(SipMessage::Request(mut req)) = parse_datagram(raw.as_bytes()) else {
            panic!("test request does not parse");
        };
        for_transport(req.headers_mut(), true, Transport::Udp);
        assert_eq!(req.header("Contact"), Some("<sip:siptg@127.0.0.1:5061>"));
        for_transport(req.headers_mut(), true, Transport::Tls);
        let via = req.headers().get_all("Via").next().unwrap_or_default();
        assert!(via.starts_with("SIP/2.0/TLS 127.0.0.1:5060"), "{via}");
        assert_eq!(
            req.header("Contact"),
            Some("<sip:siptg@127.0.0.1:5061;transport=tls>")
        );
    }
}
