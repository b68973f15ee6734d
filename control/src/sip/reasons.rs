//! SIP reason phrases exactly as SIP.TG sends them (see the product text in `shared/seed`):
//! PBX administrators match on these strings, so they must not drift.

/// 503: the Worker cannot reach its Manager (or the Manager did not answer in time).
pub const NO_RESPONSE_FROM_MANAGER: &str = "No response from Manager";
/// 404: no connection or route matches the request.
pub const ROUTE_NOT_FOUND: &str = "Route not found";
/// 500: the state database failed.
pub const DATABASE_ERROR: &str = "Database error";
/// 403: a REGISTER's digest response does not match the connection's password.
pub const WRONG_PASSWORD: &str = "Wrong password";
/// 403: the request comes from outside the connection's trusted IPs.
pub const UNTRUSTED_IP: &str = "Untrusted IP address";
/// 405: an INVITE on a registration-type connection whose PBX has not registered.
pub const REGISTER_REQUIRED: &str = "REGISTER is required first";
/// 403: the gateway's Telegram account is logged out or Telegram no longer accepts it.
pub const TELEGRAM_SESSION_INACTIVE: &str = "Telegram session is inactive";
/// 403: the gateway's Session Storage is not linked.
pub const STORAGE_INACTIVE: &str = "Session storage is inactive";
/// 403: the Worker serving the connection is disabled.
pub const WORKER_INACTIVE: &str = "Worker is inactive";
/// 403: a PBX→gateway connection has no Worker to register at.
pub const WORKER_ADDRESS_NOT_SET: &str = "Worker address is not set";
/// 403: the caller may not use this gateway (not its session).
pub const ROUTE_NOT_PERMITTED: &str = "Route is not permitted";
/// 403: the called Telegram user does not accept calls from the gateway's account.
pub const USER_PRIVACY_RESTRICTED: &str = "USER_PRIVACY_RESTRICTED";
/// 404: the number is not a Telegram user.
pub const NOT_FOUND: &str = "Not Found";
/// 404: a user id the account has never met.
pub const CHAT_NOT_FOUND: &str = "Chat not found";
/// 404: no such username.
pub const USERNAME_NOT_OCCUPIED: &str = "USERNAME_NOT_OCCUPIED";
/// 408: Telegram did not answer in time.
pub const RPC_TIMEOUT: &str = "Timeout of waiting RPC result";
/// 470: the caller cannot be identified to Telegram.
pub const ANONYMOUS_USER: &str = "Anonymous user";
/// 482: a Telegram user who is itself a gateway account calls a gateway.
pub const CALLER_HAS_GATEWAY: &str = "Caller has active gateway accounts";
/// 503: the gateway's account is not connected in its Storage.
pub const ACCOUNT_NOT_RUNNING: &str = "Account is not running";
/// 503: the account is known but its session is not running.
pub const SESSION_NOT_RUNNING: &str = "Session is not running";
/// 503: the Storage cannot be reached.
pub const STORAGE_UNAVAILABLE: &str = "Telegram storage is unavailable";
/// 503: Telegram's flood limit (followed by the seconds).
pub const TOO_MANY_REQUESTS: &str = "Too Many Requests: retry after";
/// 503: Telegram's PEER_FLOOD.
pub const PEER_FLOOD: &str = "PEER_FLOOD";
/// 503: the Worker is starting (its dataplane is not up).
pub const WORKER_NOT_READY: &str = "Worker is not ready";
/// 503: the PBX side of a Telegram → PBX call cannot be reached (not registered).
pub const SIP_ACCOUNT_UNAVAILABLE: &str = "SIP account is unavailable";
/// 503: no Worker can take a Telegram → PBX call.
pub const WORKER_UNAVAILABLE: &str = "Worker is unavailable";
/// 380: incoming calls are forbidden on the account.
pub const CALLBACK_RESTRICTED: &str = "Callback is restricted";
/// 402: the gateway's plan forbids one of its settings (a connection on a Worker outside
/// `allowed_workers`).
pub const DISALLOWED_SETTINGS: &str = "SIP account has disallowed settings";
/// 402: the gateway used up its calls' total duration for the month (`monthly_duration`).
pub const DURATION_EXCEEDED: &str = "Total calls duration is exceeded";
/// 402: too many of the gateway's calls to Telegram failed within the last hour
/// (`failed_calls_per_hour`).
pub const FAIL_CALLS_EXCEEDED: &str = "Amount of fail calls is exceeded";
/// 403: a `MESSAGE` to a gateway whose text messages are switched off (`messages = false`).
/// siptg's own phrase (SIP.TG has no SIP messages): a switched-off feature answers rather than
/// drops silently.
pub const MESSAGES_DISABLED: &str = "Messages are disabled";
