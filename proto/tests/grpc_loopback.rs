//! The generated tonic clients and servers talk to each other over a real
//! loopback TCP socket, on the gRPC paths Istio uses.

use ambient_proto::tonic::codegen::tokio_stream::{self, wrappers::TcpListenerStream, StreamExt};
use ambient_proto::tonic::{self, transport::Server, Request, Response, Status, Streaming};
use ambient_proto::{ca, discovery, workload, ADDRESS_TYPE_URL};
use std::pin::Pin;

struct TestCa;

#[tonic::async_trait]
impl ca::istio_certificate_service_server::IstioCertificateService for TestCa {
    async fn create_certificate(
        &self,
        req: Request<ca::IstioCertificateRequest>,
    ) -> Result<Response<ca::IstioCertificateResponse>, Status> {
        let auth = req
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        let r = req.into_inner();
        Ok(Response::new(ca::IstioCertificateResponse {
            cert_chain: vec![
                format!("leaf:{}:{}", r.csr, r.validity_duration),
                auth.unwrap_or_default(),
            ],
        }))
    }
}

struct TestAds;

type RespStream = Pin<
    Box<dyn tokio_stream::Stream<Item = Result<discovery::DeltaDiscoveryResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl discovery::aggregated_discovery_service_server::AggregatedDiscoveryService for TestAds {
    type DeltaAggregatedResourcesStream = RespStream;

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<discovery::DeltaDiscoveryRequest>>,
    ) -> Result<Response<RespStream>, Status> {
        // Answer every request with one resource named after its first subscription.
        let out = req.into_inner().map(|r| {
            let r = r?;
            let addr = workload::Address {
                r#type: Some(workload::address::Type::Workload(workload::Workload {
                    uid: r
                        .resource_names_subscribe
                        .first()
                        .cloned()
                        .unwrap_or_default(),
                    ..Default::default()
                })),
            };
            Ok(discovery::DeltaDiscoveryResponse {
                type_url: r.type_url,
                nonce: format!("nonce-{}", r.response_nonce),
                resources: vec![discovery::Resource {
                    name: "r".into(),
                    version: "1".into(),
                    resource: Some(ambient_proto::prost_types::Any::from_msg(&addr).unwrap()),
                    ..Default::default()
                }],
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

#[tokio::test]
async fn ca_and_ads_over_loopback() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        Server::builder()
            .add_service(ca::istio_certificate_service_server::IstioCertificateServiceServer::new(TestCa))
            .add_service(
                discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer::new(
                    TestAds,
                ),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let url = format!("http://{addr}");

    // Unary CA call, with the bearer token in request metadata.
    let mut ca_client =
        ca::istio_certificate_service_client::IstioCertificateServiceClient::connect(url.clone())
            .await
            .unwrap();
    let mut req = Request::new(ca::IstioCertificateRequest {
        csr: "CSR".into(),
        validity_duration: 3600,
        metadata: None,
    });
    req.metadata_mut()
        .insert("authorization", "Bearer tok".parse().unwrap());
    let resp = ca_client
        .create_certificate(req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.cert_chain,
        vec!["leaf:CSR:3600".to_string(), "Bearer tok".to_string()]
    );

    // Bidirectional delta ADS stream: two requests, two responses.
    let mut ads =
        discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::connect(
            url,
        )
        .await
        .unwrap();
    let reqs = vec![
        discovery::DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            resource_names_subscribe: vec!["w1".into()],
            ..Default::default()
        },
        discovery::DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE_URL.into(),
            response_nonce: "a".into(),
            ..Default::default()
        },
    ];
    let mut stream = ads
        .delta_aggregated_resources(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.type_url, ADDRESS_TYPE_URL);
    assert_eq!(first.nonce, "nonce-");
    let got = first.resources[0]
        .resource
        .as_ref()
        .unwrap()
        .to_msg::<workload::Address>()
        .unwrap();
    match got.r#type {
        Some(workload::address::Type::Workload(w)) => assert_eq!(w.uid, "w1"),
        other => panic!("unexpected payload {other:?}"),
    }
    let second = stream.message().await.unwrap().unwrap();
    assert_eq!(second.nonce, "nonce-a");
    assert!(stream.message().await.unwrap().is_none());

    server.abort();
}
