//! Reading CRI-format container log files (`<RFC3339 nanos> <stream> <P|F> <line>`) the way
//! `kubectl logs` asks for them: `timestamps`, `tailLines`, `limitBytes`, `sinceSeconds`,
//! `sinceTime`, `previous`, `follow`.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use k8s_openapi::jiff::Timestamp;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    pub limit_bytes: Option<u64>,
    /// Only lines at or after this time (from `sinceTime` or `sinceSeconds`).
    pub since: Option<Timestamp>,
}

impl LogOptions {
    /// From the query string of `/containerLogs/...`; `now` anchors `sinceSeconds`.
    pub fn parse(query: &str, now: SystemTime) -> Result<LogOptions, String> {
        let mut o = LogOptions::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
            let v = percent_decode(v);
            let flag = |v: &str| matches!(v, "true" | "1" | "True" | "");
            let num = |v: &str| {
                v.parse::<i64>()
                    .map_err(|_| format!("{k}={v:?} is not an integer"))
            };
            match k {
                "follow" => o.follow = flag(&v),
                "previous" => o.previous = flag(&v),
                "timestamps" => o.timestamps = flag(&v),
                "tailLines" => {
                    let n = num(&v)?;
                    // Negative means "all" for kubectl's default of -1.
                    o.tail_lines = u64::try_from(n).ok();
                }
                "limitBytes" => {
                    let n = num(&v)?;
                    if n <= 0 {
                        return Err(format!("limitBytes={n} must be positive"));
                    }
                    o.limit_bytes = Some(n as u64);
                }
                "sinceSeconds" => {
                    let n = num(&v)?;
                    if n <= 0 {
                        return Err(format!("sinceSeconds={n} must be positive"));
                    }
                    let t = now
                        .checked_sub(Duration::from_secs(n as u64))
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    o.since = Timestamp::try_from(t).ok();
                }
                "sinceTime" => {
                    o.since = Some(
                        Timestamp::from_str(&v)
                            .map_err(|e| format!("sinceTime={v:?} is not RFC 3339: {e}"))?,
                    );
                }
                _ => {}
            }
        }
        Ok(o)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One parsed CRI log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line<'a> {
    pub stamp: &'a str,
    pub stream: &'a str,
    pub text: &'a str,
}

pub fn parse_line(line: &str) -> Option<Line<'_>> {
    let mut parts = line.splitn(4, ' ');
    let stamp = parts.next()?;
    let stream = parts.next()?;
    let _tag = parts.next()?;
    let text = parts.next().unwrap_or("");
    Some(Line {
        stamp,
        stream,
        text,
    })
}

/// Formats one line for the client, or `None` if `since` filters it out.
pub fn render_line(line: &str, o: &LogOptions) -> Option<String> {
    let l = parse_line(line)?;
    if let Some(since) = o.since {
        match Timestamp::from_str(l.stamp) {
            Ok(t) if t < since => return None,
            _ => {}
        }
    }
    Some(if o.timestamps {
        format!("{} {}\n", l.stamp, l.text)
    } else {
        format!("{}\n", l.text)
    })
}

/// What `kubectl logs` shows of a whole file's text (complete lines only), honouring `since`,
/// `tailLines`, `timestamps` and `limitBytes`.
pub fn render(text: &str, o: &LogOptions) -> String {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut lines: Vec<String> = complete.lines().filter_map(|l| render_line(l, o)).collect();
    if let Some(n) = o.tail_lines {
        let n = n as usize;
        if lines.len() > n {
            lines.drain(..lines.len() - n);
        }
    }
    let mut out = lines.concat();
    if let Some(limit) = o.limit_bytes {
        truncate_bytes(&mut out, limit as usize);
    }
    out
}

pub fn truncate_bytes(s: &mut String, limit: usize) {
    if s.len() > limit {
        let mut cut = limit;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "2026-11-24T20:00:00.000000001Z stdout F one\n\
2026-11-24T20:00:01.5Z stderr F two words\n\
2026-11-24T20:00:02Z stdout F three\n\
2026-11-24T20:00:03Z stdout F partial";

    #[test]
    fn whole_file_and_options() {
        let o = LogOptions::default();
        assert_eq!(render(LOG, &o), "one\ntwo words\nthree\n");
        let o = LogOptions::parse("tailLines=2&timestamps=true", SystemTime::now()).unwrap();
        assert_eq!(
            render(LOG, &o),
            "2026-11-24T20:00:01.5Z two words\n2026-11-24T20:00:02Z three\n"
        );
        let o = LogOptions::parse("sinceTime=2026-11-24T20%3A00%3A01Z", SystemTime::now()).unwrap();
        assert_eq!(render(LOG, &o), "two words\nthree\n");
        let o = LogOptions::parse("limitBytes=6", SystemTime::now()).unwrap();
        assert_eq!(render(LOG, &o), "one\ntw");
        let o = LogOptions::parse("tailLines=-1&follow=true", SystemTime::now()).unwrap();
        assert!(o.follow);
        assert_eq!(o.tail_lines, None);
    }

    #[test]
    fn since_seconds_is_relative_to_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_550_402); // 20:00:02Z
        let o = LogOptions::parse("sinceSeconds=1", now).unwrap();
        assert_eq!(render(LOG, &o), "two words\nthree\n");
        assert!(LogOptions::parse("sinceSeconds=x", now).is_err());
        assert!(LogOptions::parse("limitBytes=0", now).is_err());
    }
}
