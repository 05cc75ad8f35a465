//! HTTP as both proxies handle it: the streamed [`body::Body`], hop-by-hop [`headers`], the
//! JSON [`errors`] every refusal uses, and [`trace`] context across hops.

pub mod body;
pub mod errors;
pub mod headers;
pub mod trace;
