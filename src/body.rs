//! Reading a whole HTTP body. `BodyExt::collect` queues every frame and copies them
//! out at the end; a body that arrives in one frame (the usual case, on both the
//! client's side and the upstream's) is returned here as it is, without a copy.

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;

/// The whole body; a read error ends it.
pub async fn read_all<B>(mut body: B) -> Result<Bytes, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    while let Some(frame) = body.frame().await {
        // Trailers carry nothing for us.
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            earlier => {
                if let Some(earlier) = earlier {
                    joined.extend_from_slice(&earlier);
                }
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn frames(parts: &[&'static str]) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = parts
            .iter()
            .map(|p| Ok(http_body::Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn joins_frames_in_order() {
        assert_eq!(read_all(frames(&[])).await.unwrap(), "");
        assert_eq!(read_all(frames(&["one"])).await.unwrap(), "one");
        assert_eq!(read_all(frames(&["a", "b"])).await.unwrap(), "ab");
        assert_eq!(
            read_all(frames(&["a", "", "bc", "d"])).await.unwrap(),
            "abcd"
        );
        assert_eq!(read_all(frames(&["", "x"])).await.unwrap(), "x");
        let full = Full::new(Bytes::from_static(b"whole"));
        assert_eq!(read_all(full).await.unwrap(), "whole");
    }

    #[tokio::test]
    async fn a_failed_frame_is_an_error() {
        let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"a"))),
            Err(std::io::Error::other("reset")),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        assert!(read_all(body).await.is_err());
    }
}
