//! A response as the layer stores it: status, the replayed headers, the
//! trailers and the body, in a compact binary form (no JSON: bodies are
//! bytes, replayed byte for byte).
//!
//! | bytes | content |
//! |---|---|
//! | 2 | status, big-endian; [`TRAILERS`] set when trailers follow the headers |
//! | 2 | header count |
//! | per header | name length (2), name, value length (4), value |
//! | with [`TRAILERS`]: 2, and per trailer as per header | trailer count, trailers |
//! | rest | body |
//!
//! A record written before trailers were stored has no flag, and reads as a
//! response without them.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// The flag on the stored status that says trailers follow the headers.
const TRAILERS: u16 = 0x8000;

type Fields = Vec<(HeaderName, HeaderValue)>;

/// A response the layer stores or replays.
#[derive(Debug)]
pub(crate) struct StoredResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: Fields,
    pub(crate) body: Bytes,
    /// The trailers (e.g. gRPC's `grpc-status`), if the response had any.
    pub(crate) trailers: Option<HeaderMap>,
}

fn put_fields<'a>(
    out: &mut BytesMut,
    fields: impl ExactSizeIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) {
    out.put_u16(u16::try_from(fields.len()).unwrap_or(u16::MAX));
    for (name, value) in fields.take(usize::from(u16::MAX)) {
        out.put_u16(u16::try_from(name.as_str().len()).unwrap_or(0));
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(u32::try_from(value.len()).unwrap_or(0));
        out.put_slice(value.as_bytes());
    }
}

fn get_fields(buf: &mut Bytes) -> Option<Fields> {
    if buf.remaining() < 2 {
        return None;
    }
    let count = buf.get_u16();
    let mut fields = Vec::with_capacity(usize::from(count));
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
        fields.push((name, value));
    }
    Some(fields)
}

impl StoredResponse {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let size = self
            .headers
            .iter()
            .map(|(n, v)| (n, v))
            .chain(self.trailers.iter().flatten())
            .map(|(n, v)| 6 + n.as_str().len() + v.len())
            .sum::<usize>();
        let mut out = BytesMut::with_capacity(6 + size + self.body.len());
        let flag = if self.trailers.is_some() { TRAILERS } else { 0 };
        out.put_u16(self.status.as_u16() | flag);
        put_fields(&mut out, self.headers.iter().map(|(n, v)| (n, v)));
        if let Some(trailers) = &self.trailers {
            put_fields(&mut out, trailers.iter().collect::<Vec<_>>().into_iter());
        }
        out.put_slice(&self.body);
        out.to_vec()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let mut buf = Bytes::copy_from_slice(bytes);
        if buf.remaining() < 2 {
            return None;
        }
        let status = buf.get_u16();
        let headers = get_fields(&mut buf)?;
        let trailers = if status & TRAILERS == 0 {
            None
        } else {
            Some(get_fields(&mut buf)?.into_iter().collect())
        };
        Some(Self {
            status: StatusCode::from_u16(status & !TRAILERS).ok()?,
            headers,
            body: buf,
            trailers,
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
            trailers: None,
        };
        let back = StoredResponse::decode(&response.encode()).unwrap();
        assert_eq!(back.status, response.status);
        assert_eq!(back.headers, response.headers);
        assert_eq!(back.body, response.body);
        assert!(back.trailers.is_none());
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("9"));
        trailers.insert("grpc-message", HeaderValue::from_static("not\tfound"));
        let with = StoredResponse {
            trailers: Some(trailers.clone()),
            ..response
        };
        let back = StoredResponse::decode(&with.encode()).unwrap();
        assert_eq!(back.status, StatusCode::CREATED);
        assert_eq!((back.headers, back.body), (with.headers, with.body));
        assert_eq!(back.trailers, Some(trailers));
        assert!(StoredResponse::decode(b"\x00").is_none());
        assert!(StoredResponse::decode(b"\x00\xc8\x00\x05").is_none());
    }
}
