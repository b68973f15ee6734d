//! SIP reason phrases exactly as SIP.TG sends them (see the product text in `shared/seed`):
//! PBX administrators match on these strings, so they must not drift.

/// 503: the Worker cannot reach its Manager (or the Manager did not answer in time).
pub const NO_RESPONSE_FROM_MANAGER: &str = "No response from Manager";
/// 404: no connection or route matches the request.
pub const ROUTE_NOT_FOUND: &str = "Route not found";
/// 500: the state database failed.
pub const DATABASE_ERROR: &str = "Database error";
