//! Seeded random and oversized protobuf bytes into every RPC, as raw gRPC
//! frames through a pass-through codec. The coordinator must answer each
//! with an error unless the bytes happen to decode as a valid message, and
//! must keep serving: a federation afterwards still completes.

use std::time::Duration;

use bytes_codec::RawCodec;
use fedcart_proto::v1 as pb;
use fedcart_tests::*;
use prost::Message;

mod bytes_codec {
    //! A codec that sends and receives message bytes unchanged.
    use tonic::Status;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    #[derive(Default, Clone, Copy)]
    pub struct RawCodec;
    pub struct Raw;

    impl Encoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            use bytes::BufMut;
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            use bytes::Buf;
            let mut v = vec![0; src.remaining()];
            src.copy_to_slice(&mut v);
            Ok(Some(v))
        }
    }

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }
}

/// splitmix64: a tiny seeded generator, enough for fuzz bytes.
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const SVC: &str = "/fedcart.v1.Coordinator/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_oversized_bytes_into_every_rpc_get_errors_and_never_crash() {
    let store = tempfile::tempdir().unwrap();
    let split = telco_split(2, 21);
    let coord =
        start_coordinator(&store.path().join("c.redb"), churn_run("fuzz", 1, 2, 2), 0).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", coord.addr))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(ch);
    let mut g = Gen(0xF0CC_ACC1A);
    let (mut errors, mut decodable_ok) = (0, 0);
    for case in 0..200 {
        // Mostly small messages; every 25th larger than the 2 MiB + 64 KiB limit.
        let len = if case % 25 == 24 {
            (3 << 20) + (g.next() % 1000) as usize
        } else {
            (g.next() % 300) as usize
        };
        let payload = g.bytes(len);
        grpc.ready().await.unwrap();
        let (method, result, decodes) = match case % 5 {
            0 => {
                let path = format!("{SVC}Join").parse().unwrap();
                let r = grpc
                    .server_streaming(tonic::Request::new(payload.clone()), path, RawCodec)
                    .await;
                let ok = match r {
                    Ok(resp) => resp.into_inner().message().await.map(|_| ()),
                    Err(e) => Err(e),
                };
                ("Join", ok, pb::JoinRequest::decode(&payload[..]).is_ok())
            }
            1 => {
                let path = format!("{SVC}DownloadModel").parse().unwrap();
                let r = grpc
                    .server_streaming(tonic::Request::new(payload.clone()), path, RawCodec)
                    .await;
                let ok = match r {
                    Ok(resp) => resp.into_inner().message().await.map(|_| ()),
                    Err(e) => Err(e),
                };
                // Even a decodable request names no joined session.
                ("DownloadModel", ok, false)
            }
            2 => {
                let path = format!("{SVC}SubmitUpdate").parse().unwrap();
                let frames = vec![payload.clone(), g.bytes(64)];
                let r = grpc
                    .client_streaming(
                        tonic::Request::new(futures::stream::iter(frames)),
                        path,
                        RawCodec,
                    )
                    .await
                    .map(|_| ());
                ("SubmitUpdate", r, false)
            }
            3 => {
                let path = format!("{SVC}SecAgg").parse().unwrap();
                let r = grpc
                    .unary(tonic::Request::new(payload.clone()), path, RawCodec)
                    .await
                    .map(|_| ());
                ("SecAgg", r, false)
            }
            _ => {
                let path = format!("{SVC}Status").parse().unwrap();
                let r = grpc
                    .unary(tonic::Request::new(payload.clone()), path, RawCodec)
                    .await
                    .map(|_| ());
                (
                    "Status",
                    r,
                    len < (2 << 20) && pb::StatusRequest::decode(&payload[..]).is_ok(),
                )
            }
        };
        match result {
            Err(status) => {
                assert_ne!(
                    status.code(),
                    tonic::Code::Unknown,
                    "case {case} {method}: {status}"
                );
                errors += 1;
            }
            Ok(()) => {
                assert!(
                    decodes,
                    "case {case}: {method} accepted {len} undecodable bytes"
                );
                decodable_ok += 1;
            }
        }
    }
    eprintln!("fuzz: 200 cases, {errors} errors, {decodable_ok} valid-looking messages accepted");
    assert!(
        errors >= 150,
        "{errors} errors, {decodable_ok} accepted valid-looking messages"
    );

    // Still serving: a real federation completes.
    let agents: Vec<_> = (0..2)
        .map(|k| spawn_agent(coord.addr, load_merchant(&format!("m{k}"), &split.files[k])))
        .collect();
    coord.wait_finished().await.unwrap();
    for a in agents {
        a.stop().await;
    }
}
