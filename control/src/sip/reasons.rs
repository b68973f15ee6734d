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
