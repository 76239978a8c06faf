//! Parsing a module's CGI response (its stdout).
//!
//! The output is a header block, an empty line (LF or CRLF; mixed line
//! endings are allowed), then the body. The body starts at
//! [`CgiResponse::body_offset`].

use http::{HeaderName, HeaderValue, StatusCode};

/// Largest accepted header block, in bytes, including the empty line that
/// ends it.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Most header lines accepted (the `Status` line counts).
pub const MAX_HEADERS: usize = 100;

/// How much of the output an error message quotes.
const PREVIEW_LEN: usize = 80;

/// A parsed CGI response head.
#[derive(Debug)]
pub struct CgiResponse {
    pub status: StatusCode,
    /// In the order the module wrote them, repeats kept; `Status` excluded.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Where the body starts in the parsed output.
    pub body_offset: usize,
}

/// Why a module's output is not a valid CGI response. Each becomes a 502
/// upstream, so each message says what the module did wrong.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error(
        "the module wrote nothing to stdout; a WAGI module must print CGI headers \
         (e.g. 'Content-Type: text/plain'), an empty line, then the body"
    )]
    Empty,
    #[error(
        "the module's output has no empty line ending the CGI header block; it must print \
         headers (e.g. 'Content-Type: text/plain'), an empty line, then the body. \
         Output began: \"{preview}\""
    )]
    NoHeaderEnd { preview: String },
    #[error("the module's CGI header block is larger than {limit} bytes")]
    HeaderBlockTooLarge { limit: usize },
    #[error("the module's CGI header block has more than {limit} header lines")]
    TooManyHeaders { limit: usize },
    #[error(
        "line {line} of the module's CGI header block is not 'Name: value' (no ':'): \"{text}\""
    )]
    MissingColon { line: usize, text: String },
    #[error("line {line} of the module's CGI header block has an invalid header name \"{name}\"")]
    InvalidHeaderName { line: usize, name: String },
    #[error(
        "line {line} of the module's CGI header block has an invalid value for header \
         \"{name}\" (control characters are not allowed)"
    )]
    InvalidHeaderValue { line: usize, name: String },
    #[error("line {line}: invalid CGI Status \"{value}\": {reason}")]
    InvalidStatus {
        line: usize,
        value: String,
        reason: &'static str,
    },
    #[error("line {line}: the module gave a CGI Status header more than once")]
    DuplicateStatus { line: usize },
    #[error(
        "the module's CGI header block has none of Content-Type, Location or Status \
         (at least one is required)"
    )]
    MissingRequiredHeader,
}

/// Quotes bytes for an error message: escaped, truncated.
fn preview(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(PREVIEW_LEN)];
    let mut s = shown.escape_ascii().to_string();
    if bytes.len() > PREVIEW_LEN {
        s.push_str("...");
    }
    s
}

/// Finds the header block: returns the header lines (without line endings)
/// and the offset of the body.
fn split_head(stdout: &[u8]) -> Result<(Vec<&[u8]>, usize), ResponseError> {
    if stdout.is_empty() {
        return Err(ResponseError::Empty);
    }
    let mut lines = Vec::new();
    let mut pos = 0;
    loop {
        let Some(nl) = stdout[pos..].iter().position(|&b| b == b'\n') else {
            return Err(if stdout.len() > MAX_HEADER_BLOCK {
                ResponseError::HeaderBlockTooLarge {
                    limit: MAX_HEADER_BLOCK,
                }
            } else {
                ResponseError::NoHeaderEnd {
                    preview: preview(stdout),
                }
            });
        };
        let end = pos + nl; // index of '\n'
        if end + 1 > MAX_HEADER_BLOCK {
            return Err(ResponseError::HeaderBlockTooLarge {
                limit: MAX_HEADER_BLOCK,
            });
        }
        let line = &stdout[pos..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos = end + 1;
        if line.is_empty() {
            return Ok((lines, pos));
        }
        if lines.len() == MAX_HEADERS {
            return Err(ResponseError::TooManyHeaders { limit: MAX_HEADERS });
        }
        lines.push(line);
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ws(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ws(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

fn parse_status(line: usize, value: &[u8]) -> Result<StatusCode, ResponseError> {
    let bad = |reason| ResponseError::InvalidStatus {
        line,
        value: preview(value),
        reason,
    };
    let code = value
        .split(|&b| b == b' ' || b == b'\t')
        .next()
        .unwrap_or_default();
    if code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
        return Err(bad(
            "expected a three-digit code, optionally followed by a reason phrase",
        ));
    }
    let status = StatusCode::from_bytes(code).map_err(|_| bad("not a valid HTTP status code"))?;
    if status.is_informational() {
        return Err(bad("a 1xx status cannot be a final response"));
    }
    if status.as_u16() > 599 {
        return Err(bad("status codes above 599 are not allowed"));
    }
    Ok(status)
}

/// Parses a module's stdout as a CGI response.
///
/// `Status: 404 Not Found` (or `Status: 404`) sets the status and is not
/// forwarded (its reason phrase is ignored); `Location` without `Status`
/// gives 302 Found; otherwise 200. At least one of `Content-Type`,
/// `Location`, `Status` is required. Never panics.
pub fn parse(stdout: &[u8]) -> Result<CgiResponse, ResponseError> {
    let (lines, body_offset) = split_head(stdout)?;
    let mut status: Option<StatusCode> = None;
    let mut has_location = false;
    let mut has_content_type = false;
    let mut headers = Vec::with_capacity(lines.len());
    for (index, raw) in lines.into_iter().enumerate() {
        let line = index + 1;
        let Some(colon) = raw.iter().position(|&b| b == b':') else {
            return Err(ResponseError::MissingColon {
                line,
                text: preview(raw),
            });
        };
        let (name, value) = (&raw[..colon], trim(&raw[colon + 1..]));
        let name = HeaderName::from_bytes(name).map_err(|_| ResponseError::InvalidHeaderName {
            line,
            name: preview(name),
        })?;
        if name.as_str() == "status" {
            if status.is_some() {
                return Err(ResponseError::DuplicateStatus { line });
            }
            status = Some(parse_status(line, value)?);
            continue;
        }
        let value =
            HeaderValue::from_bytes(value).map_err(|_| ResponseError::InvalidHeaderValue {
                line,
                name: name.to_string(),
            })?;
        has_location |= name == http::header::LOCATION;
        has_content_type |= name == http::header::CONTENT_TYPE;
        headers.push((name, value));
    }
    if status.is_none() && !has_location && !has_content_type {
        return Err(ResponseError::MissingRequiredHeader);
    }
    let status = status.unwrap_or(if has_location {
        StatusCode::FOUND
    } else {
        StatusCode::OK
    });
    Ok(CgiResponse {
        status,
        headers,
        body_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(out: &[u8]) -> CgiResponse {
        parse(out)
            .unwrap_or_else(|e| panic!("{:?} should parse: {e}", out.escape_ascii().to_string()))
    }

    fn err(out: &[u8]) -> ResponseError {
        match parse(out) {
            Ok(r) => panic!(
                "{:?} should fail, got {r:?}",
                out.escape_ascii().to_string()
            ),
            Err(e) => e,
        }
    }

    fn pairs(r: &CgiResponse) -> Vec<(String, String)> {
        r.headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn lf() {
        let out = b"Content-Type: text/plain\n\nhello";
        let r = ok(out);
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            pairs(&r),
            vec![("content-type".into(), "text/plain".into())]
        );
        assert_eq!(&out[r.body_offset..], b"hello");
    }

    #[test]
    fn crlf() {
        let out = b"Content-Type: text/html\r\nX-A: 1\r\n\r\n<p>hi</p>\r\n";
        let r = ok(out);
        assert_eq!(
            pairs(&r),
            vec![
                ("content-type".into(), "text/html".into()),
                ("x-a".into(), "1".into())
            ]
        );
        assert_eq!(&out[r.body_offset..], b"<p>hi</p>\r\n");
    }

    #[test]
    fn mixed_line_endings() {
        let out = b"Content-Type: a/b\r\nX-B: 2\n\r\nbody\n\nmore";
        let r = ok(out);
        assert_eq!(r.headers.len(), 2);
        assert_eq!(&out[r.body_offset..], b"body\n\nmore");
        let out = b"Content-Type: a/b\nX-B: 2\r\n\nbody";
        assert_eq!(&out[ok(out).body_offset..], b"body");
    }

    #[test]
    fn empty_body_and_whitespace_trimming() {
        let out = b"Content-Type:text/plain\nX-Pad: \t spaced out \t\nX-Empty:\n\n";
        let r = ok(out);
        assert_eq!(r.body_offset, out.len());
        assert_eq!(
            pairs(&r),
            vec![
                ("content-type".into(), "text/plain".into()),
                ("x-pad".into(), "spaced out".into()),
                ("x-empty".into(), "".into()),
            ]
        );
    }

    #[test]
    fn body_may_contain_anything() {
        let mut out = b"Content-Type: application/octet-stream\n\n".to_vec();
        let body = [0u8, 255, b'\n', b'\n', b':', 13, 10];
        out.extend_from_slice(&body);
        let r = ok(&out);
        assert_eq!(&out[r.body_offset..], &body);
    }

    #[test]
    fn status_forms() {
        let r = ok(b"Status: 404 Not Found\nContent-Type: text/plain\n\nnope");
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(
            pairs(&r),
            vec![("content-type".into(), "text/plain".into())]
        );
        let r = ok(b"Status: 404\n\n");
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert!(r.headers.is_empty());
        let r = ok(b"status:   201   Created Here  \r\n\r\n");
        assert_eq!(r.status, StatusCode::CREATED);
        let r = ok(b"STATUS: 418 I'm a teapot\n\n");
        assert_eq!(r.status.as_u16(), 418);
        // Reason phrase is not required to match.
        let r = ok(b"Status: 500 Fine Actually\n\n");
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn location_redirect() {
        let r = ok(b"Location: https://example.com/\n\n");
        assert_eq!(r.status, StatusCode::FOUND);
        assert_eq!(
            pairs(&r),
            vec![("location".into(), "https://example.com/".into())]
        );
        let r = ok(b"Location: /elsewhere\nStatus: 301 Moved Permanently\n\n");
        assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(pairs(&r), vec![("location".into(), "/elsewhere".into())]);
        let r = ok(b"Status: 303\nLocation: /x\n\n");
        assert_eq!(r.status, StatusCode::SEE_OTHER);
    }

    #[test]
    fn repeated_headers_kept_in_order() {
        let r = ok(b"Content-Type: text/plain\nSet-Cookie: a=1\nX-Other: z\nSet-Cookie: b=2\n\n");
        assert_eq!(
            pairs(&r),
            vec![
                ("content-type".into(), "text/plain".into()),
                ("set-cookie".into(), "a=1".into()),
                ("x-other".into(), "z".into()),
                ("set-cookie".into(), "b=2".into()),
            ]
        );
    }

    #[test]
    fn error_empty() {
        assert!(matches!(err(b""), ResponseError::Empty));
    }

    #[test]
    fn error_no_header_end() {
        for out in [
            &b"hello world"[..],
            b"hello world\n",
            b"Content-Type: text/plain\nhello",
            b"Content-Type: text/plain\r\n",
        ] {
            match err(out) {
                e @ ResponseError::NoHeaderEnd { .. } => {
                    let msg = e.to_string();
                    assert!(msg.contains("empty line"), "{msg}");
                }
                other => panic!("{other:?}"),
            }
        }
        let msg = err(b"hello world").to_string();
        assert!(msg.contains("hello world"), "{msg}");
        // The preview is bounded and escaped.
        let msg = err(&[0xffu8; 5000]).to_string();
        assert!(msg.len() < 1000, "{msg}");
        assert!(msg.contains("\\xff"), "{msg}");
    }

    #[test]
    fn error_missing_colon() {
        match err(b"Content-Type: text/plain\nhello world\n\nbody") {
            ResponseError::MissingColon { line, text } => {
                assert_eq!(line, 2);
                assert_eq!(text, "hello world");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_invalid_name() {
        for out in [
            &b"Content Type: text/plain\n\n"[..],
            b"Content-Type : text/plain\n\n",
            b": novalue\n\n",
            b" Content-Type: x\n\n",
            b"Cont\xffent: x\nContent-Type: a\n\n",
        ] {
            assert!(
                matches!(err(out), ResponseError::InvalidHeaderName { line: 1, .. }),
                "{:?}",
                out.escape_ascii().to_string()
            );
        }
    }

    #[test]
    fn error_invalid_value() {
        match err(b"Content-Type: text/plain\nX-Bad: a\x01b\n\n") {
            e @ ResponseError::InvalidHeaderValue { line: 2, .. } => {
                assert!(e.to_string().contains("x-bad"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            err(b"Content-Type: a\x7fb\n\n"),
            ResponseError::InvalidHeaderValue { line: 1, .. }
        ));
    }

    #[test]
    fn error_bad_status() {
        for value in [
            "",
            "abc",
            "20",
            "2000",
            "099",
            "1000",
            "100 Continue",
            "101",
            "600",
            "999",
            "4o4",
            "-200",
        ] {
            let out = format!("Content-Type: text/plain\nStatus: {value}\n\n");
            match err(out.as_bytes()) {
                e @ ResponseError::InvalidStatus { line: 2, .. } => {
                    assert!(e.to_string().contains("Status"), "{e}");
                }
                other => panic!("{value:?}: {other:?}"),
            }
        }
        assert!(matches!(
            err(b"Status: 200\nStatus: 404\n\n"),
            ResponseError::DuplicateStatus { line: 2 }
        ));
    }

    #[test]
    fn error_missing_required() {
        assert!(matches!(
            err(b"X-Only: this\n\nbody"),
            ResponseError::MissingRequiredHeader
        ));
        assert!(matches!(
            err(b"\nbody"),
            ResponseError::MissingRequiredHeader
        ));
        assert!(matches!(
            err(b"\r\n\r\n"),
            ResponseError::MissingRequiredHeader
        ));
    }

    #[test]
    fn error_too_large() {
        // One huge header line.
        let mut out = b"Content-Type: text/plain\nX-Big: ".to_vec();
        out.extend(std::iter::repeat_n(b'a', MAX_HEADER_BLOCK));
        out.extend_from_slice(b"\n\nbody");
        assert!(matches!(
            err(&out),
            ResponseError::HeaderBlockTooLarge { .. }
        ));
        // Huge output without any newline.
        let out = vec![b'a'; MAX_HEADER_BLOCK + 1];
        assert!(matches!(
            err(&out),
            ResponseError::HeaderBlockTooLarge { .. }
        ));
        // A block of exactly the limit is accepted.
        let mut out = b"Content-Type: text/plain\nX-Big: ".to_vec();
        let fill = MAX_HEADER_BLOCK - out.len() - 2;
        out.extend(std::iter::repeat_n(b'a', fill));
        out.extend_from_slice(b"\n\n");
        assert_eq!(out.len(), MAX_HEADER_BLOCK);
        out.extend_from_slice(b"a big body is fine");
        assert_eq!(ok(&out).body_offset, MAX_HEADER_BLOCK);
        // A big body is fine.
        let mut out = b"Content-Type: text/plain\n\n".to_vec();
        out.extend(std::iter::repeat_n(b'z', 4 * MAX_HEADER_BLOCK));
        assert_eq!(ok(&out).body_offset, 26);
    }

    #[test]
    fn error_too_many_headers() {
        let build = |n: usize| {
            let mut s = String::from("Content-Type: text/plain\n");
            for i in 1..n {
                s.push_str(&format!("X-H{i}: v\n"));
            }
            s.push('\n');
            s
        };
        assert_eq!(ok(build(MAX_HEADERS).as_bytes()).headers.len(), MAX_HEADERS);
        assert!(matches!(
            err(build(MAX_HEADERS + 1).as_bytes()),
            ResponseError::TooManyHeaders { limit: MAX_HEADERS }
        ));
    }
}
