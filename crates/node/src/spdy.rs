//! SPDY/3.1 framing (draft-mbelshe-httpbis-spdy-00 with the 3.1 WINDOW_UPDATE changes), as
//! Kubernetes speaks it through `k8s.io/apimachinery/pkg/util/httpstream/spdy` and
//! `github.com/moby/spdystream`: the server side of `kubectl port-forward` (and of the API
//! server's WebSocket-to-SPDY tunnel, which reaches a kubelet as plain SPDY/3.1).
//!
//! Owns: turning bytes into [`Frame`]s and back, and the header blocks' zlib compression (one
//! zlib stream per direction for the whole connection, primed with the SPDY/3 dictionary, a
//! sync flush after every block). Knows nothing of port-forward; no I/O.
//!
//! Bounds: a frame longer than [`MAX_FRAME`] and a header block that inflates beyond
//! [`MAX_HEADER_BLOCK`] are errors (the connection is closed), so a peer cannot make the node
//! buffer more than that per connection.
//!
//! No crate on crates.io is a kept SPDY/3.1 codec for a server (the one multiplexer found is a
//! client over WebSocket transports), so this is a small one of our own; zlib is flate2's.

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The SPDY version this codec speaks.
pub const VERSION: u16 = 3;
/// Longest frame payload accepted from a peer. The protocol allows 16 MiB; Go's spdystream
/// writes what one `Write` was given (`io.Copy`'s 32 KiB).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest header block, inflated, accepted from a peer.
pub const MAX_HEADER_BLOCK: usize = 64 << 10;

/// `FLAG_FIN` of data and control frames.
pub const FLAG_FIN: u8 = 0x01;
/// `FLAG_UNIDIRECTIONAL` of SYN_STREAM.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;

/// RST_STREAM status codes.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// A header block: lowercase names, each with its value (several values joined by NUL).
pub type Headers = Vec<(String, String)>;

/// The value of header `name` (lowercase) in `headers`.
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One SPDY/3.1 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    /// Entries as (flags, id, value).
    Settings {
        flags: u8,
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    /// A control frame of a type this codec does not know (the spec says: ignore it).
    Unknown {
        kind: u16,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("SPDY frame of {0} bytes is longer than the {MAX_FRAME} accepted")]
    FrameTooLong(usize),
    #[error("SPDY control frame of version {0}, not 3")]
    Version(u16),
    #[error("SPDY {kind} frame of {len} bytes is too short")]
    Short { kind: &'static str, len: usize },
    #[error("SPDY header block does not inflate: {0}")]
    Inflate(String),
    #[error("SPDY header block inflates beyond {MAX_HEADER_BLOCK} bytes")]
    HeaderBlockTooLong,
    #[error("SPDY header block is malformed")]
    HeaderBlock,
    #[error("SPDY header block does not deflate: {0}")]
    Deflate(String),
    #[error("SPDY frame payload of {0} bytes does not fit a frame")]
    TooLongToSend(usize),
}

/// Reads frames from a peer's bytes; holds the peer's header-compression stream.
pub struct Decoder {
    inflate: Decompress,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            inflate: Decompress::new(true),
        }
    }
}

/// Writes frames; holds this side's header-compression stream.
pub struct Encoder {
    deflate: Compress,
}

impl Default for Encoder {
    fn default() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // Before the first byte, as zlib requires; the stream's header then names it (FDICT).
        deflate
            .set_dictionary(DICTIONARY)
            .expect("a fresh zlib stream takes a dictionary");
        Encoder { deflate }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Decoder {
    /// The next whole frame at the front of `buf` (consumed), or `None` until more bytes come.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Error> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = (u32_at(buf, 4) & 0x00ff_ffff) as usize;
        if len > MAX_FRAME {
            return Err(Error::FrameTooLong(len));
        }
        if buf.len() < 8 + len {
            buf.reserve(8 + len - buf.len());
            return Ok(None);
        }
        let head = buf.split_to(8);
        let payload = buf.split_to(len).freeze();
        let flags = head[4];
        if head[0] & 0x80 == 0 {
            return Ok(Some(Frame::Data {
                stream_id: u32_at(&head, 0) & 0x7fff_ffff,
                flags,
                data: payload,
            }));
        }
        let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
        if version != VERSION {
            return Err(Error::Version(version));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let need = |name: &'static str, n: usize| {
            if payload.len() < n {
                Err(Error::Short {
                    kind: name,
                    len: payload.len(),
                })
            } else {
                Ok(())
            }
        };
        let id31 = |at: usize| u32_at(&payload, at) & 0x7fff_ffff;
        Ok(Some(match kind {
            TYPE_SYN_STREAM => {
                need("SYN_STREAM", 10)?;
                Frame::SynStream {
                    stream_id: id31(0),
                    associated_to: id31(4),
                    priority: payload[8] >> 5,
                    flags,
                    headers: self.headers(&payload[10..])?,
                }
            }
            TYPE_SYN_REPLY => {
                need("SYN_REPLY", 4)?;
                Frame::SynReply {
                    stream_id: id31(0),
                    flags,
                    headers: self.headers(&payload[4..])?,
                }
            }
            TYPE_HEADERS => {
                need("HEADERS", 4)?;
                Frame::Headers {
                    stream_id: id31(0),
                    flags,
                    headers: self.headers(&payload[4..])?,
                }
            }
            TYPE_RST_STREAM => {
                need("RST_STREAM", 8)?;
                Frame::RstStream {
                    stream_id: id31(0),
                    status: u32_at(&payload, 4),
                }
            }
            TYPE_SETTINGS => {
                need("SETTINGS", 4)?;
                let n = u32_at(&payload, 0) as usize;
                if payload.len() < 4 + n.saturating_mul(8) {
                    return Err(Error::Short {
                        kind: "SETTINGS",
                        len: payload.len(),
                    });
                }
                let entries = (0..n)
                    .map(|i| {
                        let at = 4 + i * 8;
                        let word = u32_at(&payload, at);
                        (
                            (word >> 24) as u8,
                            word & 0x00ff_ffff,
                            u32_at(&payload, at + 4),
                        )
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            TYPE_PING => {
                need("PING", 4)?;
                Frame::Ping {
                    id: u32_at(&payload, 0),
                }
            }
            TYPE_GOAWAY => {
                need("GOAWAY", 8)?;
                Frame::GoAway {
                    last_good_stream_id: id31(0),
                    status: u32_at(&payload, 4),
                }
            }
            TYPE_WINDOW_UPDATE => {
                need("WINDOW_UPDATE", 8)?;
                Frame::WindowUpdate {
                    stream_id: id31(0),
                    delta: u32_at(&payload, 4) & 0x7fff_ffff,
                }
            }
            other => Frame::Unknown { kind: other },
        }))
    }

    /// Inflates one header block (continuing the connection's zlib stream) and parses it.
    fn headers(&mut self, mut input: &[u8]) -> Result<Headers, Error> {
        let mut out: Vec<u8> = Vec::with_capacity(256);
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(Error::HeaderBlockTooLong);
                }
                out.reserve((out.len() * 2).min(MAX_HEADER_BLOCK) - out.len() + 1);
            }
            let before_in = self.inflate.total_in();
            let before_out = self.inflate.total_out();
            let status = match self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
            {
                Ok(s) => s,
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| Error::Inflate(e.to_string()))?;
                    Status::Ok
                }
                Err(e) => return Err(Error::Inflate(e.to_string())),
            };
            let used = (self.inflate.total_in() - before_in) as usize;
            input = &input[used..];
            let produced = self.inflate.total_out() - before_out;
            if out.len() > MAX_HEADER_BLOCK {
                return Err(Error::HeaderBlockTooLong);
            }
            if status == Status::StreamEnd {
                break;
            }
            // Done when all input is in and the output had room to spare.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            if used == 0 && produced == 0 && out.len() < out.capacity() {
                // No progress with input left and room to write: a block zlib cannot read.
                return Err(Error::Inflate("no progress".into()));
            }
        }
        parse_block(&out)
    }
}

fn parse_block(b: &[u8]) -> Result<Headers, Error> {
    let mut b = b;
    let take = |b: &mut &[u8]| -> Result<Vec<u8>, Error> {
        if b.len() < 4 {
            return Err(Error::HeaderBlock);
        }
        let n = u32_at(b, 0) as usize;
        if b.len() < 4 + n {
            return Err(Error::HeaderBlock);
        }
        let v = b[4..4 + n].to_vec();
        *b = &b[4 + n..];
        Ok(v)
    };
    if b.len() < 4 {
        return Err(Error::HeaderBlock);
    }
    let count = u32_at(b, 0) as usize;
    b = &b[4..];
    // Each pair takes at least 8 bytes: a count beyond that is a lie.
    if count > b.len() / 8 {
        return Err(Error::HeaderBlock);
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name = String::from_utf8(take(&mut b)?).map_err(|_| Error::HeaderBlock)?;
        let value = String::from_utf8(take(&mut b)?).map_err(|_| Error::HeaderBlock)?;
        headers.push((name.to_ascii_lowercase(), value));
    }
    Ok(headers)
}

impl Encoder {
    /// Appends `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), Error> {
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() > 0x00ff_ffff {
                    return Err(Error::TooLongToSend(data.len()));
                }
                out.reserve(8 + data.len());
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32((u32::from(*flags) << 24) | data.len() as u32);
                out.put_slice(data);
                Ok(())
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                let block = self.block(headers)?;
                let mut p = BytesMut::with_capacity(10 + block.len());
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_u32(associated_to & 0x7fff_ffff);
                p.put_u8((priority & 0x07) << 5);
                p.put_u8(0);
                p.put_slice(&block);
                control(out, TYPE_SYN_STREAM, *flags, &p)
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.block(headers)?;
                let mut p = BytesMut::with_capacity(4 + block.len());
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_slice(&block);
                control(out, TYPE_SYN_REPLY, *flags, &p)
            }
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.block(headers)?;
                let mut p = BytesMut::with_capacity(4 + block.len());
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_slice(&block);
                control(out, TYPE_HEADERS, *flags, &p)
            }
            Frame::RstStream { stream_id, status } => {
                let mut p = BytesMut::with_capacity(8);
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_u32(*status);
                control(out, TYPE_RST_STREAM, 0, &p)
            }
            Frame::Settings { flags, entries } => {
                let mut p = BytesMut::with_capacity(4 + 8 * entries.len());
                p.put_u32(entries.len() as u32);
                for (f, id, value) in entries {
                    p.put_u32((u32::from(*f) << 24) | (id & 0x00ff_ffff));
                    p.put_u32(*value);
                }
                control(out, TYPE_SETTINGS, *flags, &p)
            }
            Frame::Ping { id } => control(out, TYPE_PING, 0, &id.to_be_bytes()),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                let mut p = BytesMut::with_capacity(8);
                p.put_u32(last_good_stream_id & 0x7fff_ffff);
                p.put_u32(*status);
                control(out, TYPE_GOAWAY, 0, &p)
            }
            Frame::WindowUpdate { stream_id, delta } => {
                let mut p = BytesMut::with_capacity(8);
                p.put_u32(stream_id & 0x7fff_ffff);
                p.put_u32(delta & 0x7fff_ffff);
                control(out, TYPE_WINDOW_UPDATE, 0, &p)
            }
            Frame::Unknown { kind } => control(out, *kind, 0, &[]),
        }
    }

    /// A header block, deflated on this side's stream and sync-flushed.
    fn block(&mut self, headers: &Headers) -> Result<Vec<u8>, Error> {
        let mut raw = BytesMut::new();
        raw.put_u32(headers.len() as u32);
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            raw.put_u32(name.len() as u32);
            raw.put_slice(name.as_bytes());
            raw.put_u32(value.len() as u32);
            raw.put_slice(value.as_bytes());
        }
        let mut input: &[u8] = &raw;
        let mut out = Vec::with_capacity(raw.len() + 64);
        loop {
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| Error::Deflate(e.to_string()))?;
            input = &input[(self.deflate.total_in() - before) as usize..];
            // A sync flush is complete when the output did not fill up.
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
            out.reserve(out.capacity().max(64));
        }
    }
}

fn control(out: &mut BytesMut, kind: u16, flags: u8, payload: &[u8]) -> Result<(), Error> {
    if payload.len() > 0x00ff_ffff {
        return Err(Error::TooLongToSend(payload.len()));
    }
    out.reserve(8 + payload.len());
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    out.put_u32((u32::from(flags) << 24) | payload.len() as u32);
    out.put_slice(payload);
    Ok(())
}

/// The SPDY/3 header-compression dictionary (the spec's section 2.6.10.1), 1423 bytes.
pub const DICTIONARY: &[u8] =
    b"\x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post\x00\x00\x00\x03put\x00\x00\
    \x00\x06delete\x00\x00\x00\x05trace\x00\x00\x00\x06accept\x00\x00\x00\x0eaccept-charset\x00\
    \x00\x00\x0faccept-encoding\x00\x00\x00\x0faccept-language\x00\x00\x00\x0daccept-ranges\x00\
    \x00\x00\x03age\x00\x00\x00\x05allow\x00\x00\x00\x0dauthorization\x00\x00\x00\x0dcache-contr\
    ol\x00\x00\x00\x0aconnection\x00\x00\x00\x0ccontent-base\x00\x00\x00\x10content-encoding\x00\
    \x00\x00\x10content-language\x00\x00\x00\x0econtent-length\x00\x00\x00\x10content-location\
    \x00\x00\x00\x0bcontent-md5\x00\x00\x00\x0dcontent-range\x00\x00\x00\x0ccontent-type\x00\x00\
    \x00\x04date\x00\x00\x00\x04etag\x00\x00\x00\x06expect\x00\x00\x00\x07expires\x00\x00\x00\
    \x04from\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\x00\x00\x11if-modified-since\x00\
    \x00\x00\x0dif-none-match\x00\x00\x00\x08if-range\x00\x00\x00\x13if-unmodified-since\x00\x00\
    \x00\x0dlast-modified\x00\x00\x00\x08location\x00\x00\x00\x0cmax-forwards\x00\x00\x00\x06pra\
    gma\x00\x00\x00\x12proxy-authenticate\x00\x00\x00\x13proxy-authorization\x00\x00\x00\x05rang\
    e\x00\x00\x00\x07referer\x00\x00\x00\x0bretry-after\x00\x00\x00\x06server\x00\x00\x00\x02te\
    \x00\x00\x00\x07trailer\x00\x00\x00\x11transfer-encoding\x00\x00\x00\x07upgrade\x00\x00\x00\
    \x0auser-agent\x00\x00\x00\x04vary\x00\x00\x00\x03via\x00\x00\x00\x07warning\x00\x00\x00\x10\
    www-authenticate\x00\x00\x00\x06method\x00\x00\x00\x03get\x00\x00\x00\x06status\x00\x00\x00\
    \x06200\x20OK\x00\x00\x00\x07version\x00\x00\x00\x08HTTP/1.1\x00\x00\x00\x03url\x00\x00\x00\
    \x06public\x00\x00\x00\x0aset-cookie\x00\x00\x00\x0akeep-alive\x00\x00\x00\x06origin10010120\
    1202205206300302303304305306307402405406407408409410411412413414415416417502504505203\x20Non\
    -Authoritative\x20Information204\x20No\x20Content301\x20Moved\x20Permanently400\x20Bad\x20Re\
    quest401\x20Unauthorized403\x20Forbidden404\x20Not\x20Found500\x20Internal\x20Server\x20Erro\
    r501\x20Not\x20Implemented503\x20Service\x20UnavailableJan\x20Feb\x20Mar\x20Apr\x20May\x20Ju\
    n\x20Jul\x20Aug\x20Sept\x20Oct\x20Nov\x20Dec\x2000:00:00\x20Mon,\x20Tue,\x20Wed,\x20Thu,\x20\
    Fri,\x20Sat,\x20Sun,\x20GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,a\
    pplication/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharse\
    t=utf-8charset=iso-8859-1,utf-,*,enq=0.";

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Frames written by github.com/moby/spdystream v0.5.1's Framer (what kubectl and the API
    // server use), in this order on one connection: the error and data streams of a
    // port-forward request as client-go opens them, data with FIN, PING, RST_STREAM (CANCEL),
    // GOAWAY, WINDOW_UPDATE, SETTINGS (initial window 64 KiB).
    const GO_FRAMES: [&str; 8] = [
        "800300010000003e0000000100000000000078f9e3c6a7c202253a703a2b294a4dcc851625aca9a0808614cb45e01c60616061c0c0c0c0590489c64c50f2663400000000ffff",
        "8003000101000017000000030000000000000211189a41e55022000000ffff",
        "0000000301000012474554202f20485454502f312e310d0a0d0a",
        "800300060000000400000001",
        "80030003000000080000000300000005",
        "80030007000000080000000300000000",
        "80030009000000080000000100010000",
        "800300040000000c000000010000000700010000",
    ];

    fn sorted(mut h: Headers) -> Headers {
        h.sort();
        h
    }

    #[test]
    fn dictionary_is_the_spdy3_one() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert!(DICTIONARY.starts_with(b"\x00\x00\x00\x07options"));
        assert!(DICTIONARY.ends_with(b"charset=iso-8859-1,utf-,*,enq=0."));
    }

    #[test]
    fn decodes_frames_written_by_spdystream() {
        let mut buf = BytesMut::new();
        for f in GO_FRAMES {
            buf.extend_from_slice(&hex(f));
        }
        let mut d = Decoder::default();
        let mut frames = Vec::new();
        while let Some(f) = d.decode(&mut buf).unwrap() {
            frames.push(f);
        }
        assert!(buf.is_empty());
        assert_eq!(frames.len(), 8);
        let Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            flags: 0,
            headers,
            ..
        } = &frames[0]
        else {
            panic!("{:?}", frames[0]);
        };
        assert_eq!(
            sorted(headers.clone()),
            sorted(vec![
                ("port".into(), "8080".into()),
                ("requestid".into(), "0".into()),
                ("streamtype".into(), "error".into()),
            ])
        );
        assert_eq!(header(headers, "streamType"), Some("error"));
        // The second block continues the first one's zlib stream.
        assert_eq!(
            frames[1],
            Frame::SynStream {
                stream_id: 3,
                associated_to: 0,
                priority: 0,
                flags: FLAG_FIN,
                headers: vec![("streamtype".into(), "data".into())],
            }
        );
        assert_eq!(
            frames[2],
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"),
            }
        );
        assert_eq!(frames[3], Frame::Ping { id: 1 });
        assert_eq!(
            frames[4],
            Frame::RstStream {
                stream_id: 3,
                status: rst::CANCEL
            }
        );
        assert_eq!(
            frames[5],
            Frame::GoAway {
                last_good_stream_id: 3,
                status: goaway::OK
            }
        );
        assert_eq!(
            frames[6],
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 65536
            }
        );
        assert_eq!(
            frames[7],
            Frame::Settings {
                flags: 0,
                entries: vec![(0, 7, 65536)]
            }
        );
    }

    #[test]
    fn waits_for_whole_frames() {
        let all = hex(GO_FRAMES[0]);
        let mut d = Decoder::default();
        let mut buf = BytesMut::new();
        for (i, b) in all.iter().enumerate() {
            buf.put_u8(*b);
            let got = d.decode(&mut buf).unwrap();
            assert_eq!(got.is_some(), i == all.len() - 1, "after {} bytes", i + 1);
        }
    }

    #[test]
    fn encodes_uncompressed_frames_as_spdystream_does() {
        let mut e = Encoder::default();
        for (frame, go) in [
            (
                Frame::Data {
                    stream_id: 3,
                    flags: FLAG_FIN,
                    data: Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"),
                },
                GO_FRAMES[2],
            ),
            (Frame::Ping { id: 1 }, GO_FRAMES[3]),
            (
                Frame::RstStream {
                    stream_id: 3,
                    status: rst::CANCEL,
                },
                GO_FRAMES[4],
            ),
            (
                Frame::GoAway {
                    last_good_stream_id: 3,
                    status: goaway::OK,
                },
                GO_FRAMES[5],
            ),
            (
                Frame::WindowUpdate {
                    stream_id: 1,
                    delta: 65536,
                },
                GO_FRAMES[6],
            ),
            (
                Frame::Settings {
                    flags: 0,
                    entries: vec![(0, 7, 65536)],
                },
                GO_FRAMES[7],
            ),
        ] {
            let mut out = BytesMut::new();
            e.encode(&frame, &mut out).unwrap();
            assert_eq!(out.as_ref(), hex(go).as_slice(), "{frame:?}");
        }
    }

    #[test]
    fn header_blocks_round_trip_on_one_stream() {
        let mut e = Encoder::default();
        let mut d = Decoder::default();
        let mut buf = BytesMut::new();
        let frames = [
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: vec![],
            },
            Frame::SynStream {
                stream_id: 2,
                associated_to: 0,
                priority: 3,
                flags: FLAG_UNIDIRECTIONAL,
                headers: vec![
                    ("streamtype".into(), "error".into()),
                    ("a".into(), "b\0c".into()),
                ],
            },
            Frame::Headers {
                stream_id: 1,
                flags: FLAG_FIN,
                headers: vec![("x".into(), "y".repeat(5000))],
            },
        ];
        for f in &frames {
            e.encode(f, &mut buf).unwrap();
        }
        for f in &frames {
            assert_eq!(&d.decode(&mut buf).unwrap().unwrap(), f);
        }
        assert!(buf.is_empty());
    }

    // What the node writes, as spdystream reads it (checked with spdystream v0.5.1's Framer):
    // the SYN_REPLY with no headers that answers a stream, then a second one on the same
    // zlib stream.
    #[test]
    fn syn_reply_is_what_spdystream_reads() {
        let mut e = Encoder::default();
        let mut out = BytesMut::new();
        for id in [1, 3] {
            e.encode(
                &Frame::SynReply {
                    stream_id: id,
                    flags: 0,
                    headers: vec![],
                },
                &mut out,
            )
            .unwrap();
        }
        let text: String = out.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(text, GO_READS_THESE);
    }

    const GO_READS_THESE: &str = "80030002000000140000000178bbe3c6a7c26260606000000000ffff800300020000000c00000003020100000000ffff";

    #[test]
    fn refuses_oversized_frames_and_header_bombs() {
        let mut d = Decoder::default();
        let mut buf = BytesMut::from(&hex("00000001 00ffffff".replace(' ', "").as_str())[..]);
        assert_eq!(d.decode(&mut buf), Err(Error::FrameTooLong(0x00ff_ffff)));
        // 200 KiB of header value deflates to a few hundred bytes.
        let mut e = Encoder::default();
        let mut buf = BytesMut::new();
        e.encode(
            &Frame::Headers {
                stream_id: 1,
                flags: 0,
                headers: vec![("x".into(), "a".repeat(200 << 10))],
            },
            &mut buf,
        )
        .unwrap();
        assert!(buf.len() < 4096, "{}", buf.len());
        let mut d = Decoder::default();
        assert_eq!(d.decode(&mut buf), Err(Error::HeaderBlockTooLong));
    }

    #[test]
    fn refuses_lying_header_counts_and_other_versions() {
        assert_eq!(parse_block(&hex("7fffffff")), Err(Error::HeaderBlock));
        assert_eq!(
            parse_block(&hex("00000001000000ff61")),
            Err(Error::HeaderBlock)
        );
        let mut buf = BytesMut::from(&hex("800200060000000400000001")[..]);
        assert_eq!(Decoder::default().decode(&mut buf), Err(Error::Version(2)));
    }
}
