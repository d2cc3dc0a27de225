//! A response as the layer stores it: status, the replayed headers and the
//! body, in a compact binary form (no JSON: bodies are bytes, replayed
//! byte for byte).
//!
//! | bytes | content |
//! |---|---|
//! | 2 | status, big-endian |
//! | 2 | header count |
//! | per header | name length (2), name, value length (4), value |
//! | rest | body |

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};

/// A response the layer stores or replays.
#[derive(Debug)]
pub(crate) struct StoredResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) body: Bytes,
}

impl StoredResponse {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let size = self
            .headers
            .iter()
            .map(|(n, v)| 6 + n.as_str().len() + v.len())
            .sum::<usize>();
        let mut out = BytesMut::with_capacity(4 + size + self.body.len());
        out.put_u16(self.status.as_u16());
        out.put_u16(u16::try_from(self.headers.len()).unwrap_or(u16::MAX));
        for (name, value) in self.headers.iter().take(usize::from(u16::MAX)) {
            out.put_u16(u16::try_from(name.as_str().len()).unwrap_or(0));
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(u32::try_from(value.len()).unwrap_or(0));
            out.put_slice(value.as_bytes());
        }
        out.put_slice(&self.body);
        out.to_vec()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let mut buf = Bytes::copy_from_slice(bytes);
        if buf.remaining() < 4 {
            return None;
        }
        let status = StatusCode::from_u16(buf.get_u16()).ok()?;
        let count = buf.get_u16();
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            if buf.remaining() < 2 {
                return None;
            }
            let len = usize::from(buf.get_u16());
            if buf.remaining() < len + 4 {
                return None;
            }
            let name = HeaderName::from_bytes(&buf.split_to(len)).ok()?;
            let len = usize::try_from(buf.get_u32()).ok()?;
            if buf.remaining() < len {
                return None;
            }
            let value = HeaderValue::from_maybe_shared(buf.split_to(len)).ok()?;
            headers.push((name, value));
        }
        Some(Self {
            status,
            headers,
            body: buf,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_round_trip_byte_for_byte() {
        let response = StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![
                (
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    HeaderName::from_static("x-charge"),
                    HeaderValue::from_static("ch_1"),
                ),
            ],
            body: Bytes::from_static(b"{\"id\":\"ch_1\"}\n\x00\xff"),
        };
        let back = StoredResponse::decode(&response.encode()).unwrap();
        assert_eq!(back.status, response.status);
        assert_eq!(back.headers, response.headers);
        assert_eq!(back.body, response.body);
        assert!(StoredResponse::decode(b"\x00").is_none());
        assert!(StoredResponse::decode(b"\x00\xc8\x00\x05").is_none());
    }
}
