//! The WAGI protocol, as pure functions and data.
//!
//! This crate owns the rules of WAGI: route patterns and their precedence
//! ([`routes`]), the CGI/1.1 environment and argv handed to a module ([`cgi`]),
//! the parsing of a module's CGI response ([`response`]) and of its `_routes`
//! output ([`routes::parse_routes_output`]).
//!
//! It must not touch anything else: no I/O (no files, sockets, clocks or
//! environment), no async, no WebAssembly runtime. Callers run the module and
//! feed this crate bytes and request metadata; this crate only computes.

pub mod cgi;
pub mod response;
pub mod routes;
