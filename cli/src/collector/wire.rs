//! What the collector reads of Envoy's access-log stream, and the gRPC
//! method that decodes only that. Per entry the collector needs the filter
//! state object holding the audit record and the response code; the rest
//! of an `HttpAccessLogEntry` (addresses, timings, request and response
//! properties: most of its fields and allocations) is skipped on the wire
//! instead of being decoded into `envoy-types`' full messages and dropped.
//! The field numbers are those of `envoy.service.accesslog.v3` and
//! `envoy.data.accesslog.v3`; the tests decode messages encoded from the
//! full types.

use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsResponse;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use std::sync::Arc;
use tonic::codegen::{http, Body, BoxFuture, Context, Poll, StdError};

/// `StreamAccessLogsMessage`, with only the HTTP entries of its
/// `log_entries` oneof (field 2); the identifier (1) and TCP entries (3)
/// are skipped, as the collector ignored them before.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LogMessage {
    #[prost(message, optional, tag = "2")]
    pub http_logs: Option<HttpEntries>,
}

/// `StreamAccessLogsMessage.HTTPAccessLogEntries`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpEntries {
    #[prost(message, repeated, tag = "1")]
    pub log_entry: Vec<HttpEntry>,
}

/// `HTTPAccessLogEntry`: its common properties (1) and response (4).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpEntry {
    #[prost(message, optional, tag = "1")]
    pub common_properties: Option<Common>,
    #[prost(message, optional, tag = "4")]
    pub response: Option<Response>,
}

/// `AccessLogCommon`: its `filter_state_objects` map (21) only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Common {
    /// The map as it is on the wire, a repeated key/value message: a list
    /// is cheaper than hashing the one or two keys Envoy sends.
    #[prost(message, repeated, tag = "21")]
    pub filter_state_objects: Vec<FilterState>,
}

/// One `filter_state_objects` entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FilterState {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<Any>,
}

/// `HTTPResponseProperties`: its response code (1) only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    #[prost(message, optional, tag = "1")]
    pub response_code: Option<UInt32Value>,
}

impl HttpEntry {
    /// The filter state object under `key`: the last one, as a map decoder
    /// keeps; an entry without a value is an empty `Any`, as there.
    pub fn filter_state(&self, key: &str) -> Option<&Any> {
        static EMPTY: Any = Any {
            type_url: String::new(),
            value: Vec::new(),
        };
        let state = self
            .common_properties
            .as_ref()?
            .filter_state_objects
            .iter()
            .rev()
            .find(|s| s.key == key)?;
        Some(state.value.as_ref().unwrap_or(&EMPTY))
    }

    pub fn response_code(&self) -> Option<u32> {
        Some(self.response.as_ref()?.response_code.as_ref()?.value)
    }
}

/// The one method of Envoy's `AccessLogService`.
const PATH: &str = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs";

/// What serves the access-log stream.
pub trait Sink: Send + Sync + 'static {
    fn stream_access_logs(
        self: Arc<Self>,
        request: tonic::Request<tonic::Streaming<LogMessage>>,
    ) -> BoxFuture<tonic::Response<StreamAccessLogsResponse>, tonic::Status>;
}

/// `AccessLogService` decoding [`LogMessage`]s: what `envoy-types`'
/// generated server does (same path, codec, size limit and compression
/// settings), with the lean message type.
pub struct AccessLogServer<S>(Arc<S>);

impl<S> AccessLogServer<S> {
    pub fn new(sink: S) -> AccessLogServer<S> {
        AccessLogServer(Arc::new(sink))
    }
}

impl<S> Clone for AccessLogServer<S> {
    fn clone(&self) -> Self {
        AccessLogServer(self.0.clone())
    }
}

impl<S> tonic::server::NamedService for AccessLogServer<S> {
    const NAME: &'static str = "envoy.service.accesslog.v3.AccessLogService";
}

struct Method<S>(Arc<S>);

impl<S: Sink> tonic::server::ClientStreamingService<LogMessage> for Method<S> {
    type Response = StreamAccessLogsResponse;
    type Future = BoxFuture<tonic::Response<Self::Response>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<LogMessage>>) -> Self::Future {
        self.0.clone().stream_access_logs(request)
    }
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for AccessLogServer<S>
where
    S: Sink,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let sink = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != PATH {
                return Ok(tonic::Status::unimplemented("").into_http());
            }
            let codec = tonic_prost::ProstCodec::<StreamAccessLogsResponse, LogMessage>::default();
            Ok(tonic::server::Grpc::new(codec)
                .client_streaming(Method(sink), req)
                .await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{
        address, socket_address, Address, SocketAddress,
    };
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
        TcpAccessLogEntry,
    };
    use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
        HttpAccessLogEntries, Identifier, LogEntries, TcpAccessLogEntries,
    };
    use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
    use envoy_types::pb::google::protobuf::{Duration, Timestamp};
    use prost::Message;

    fn any(type_url: &str, value: &[u8]) -> Any {
        Any {
            type_url: type_url.into(),
            value: value.to_vec(),
        }
    }

    /// An entry with the fields Envoy fills around the ones the collector
    /// reads, and another filter's state beside Tollgate's.
    fn full_entry(code: Option<u32>) -> HttpAccessLogEntry {
        let mut common = AccessLogCommon {
            sample_rate: 1.0,
            downstream_remote_address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "10.0.3.17".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(52_000)),
                    ..Default::default()
                })),
            }),
            start_time: Some(Timestamp {
                seconds: 1_790_000_000,
                nanos: 5,
            }),
            time_to_last_downstream_tx_byte: Some(Duration {
                seconds: 0,
                nanos: 851_000_000,
            }),
            upstream_cluster: "anthropic".into(),
            route_name: "llm".into(),
            ..Default::default()
        };
        common
            .filter_state_objects
            .insert("tollgate.audit".into(), any("t/BytesValue", b"\x0a\x02{}"));
        common
            .filter_state_objects
            .insert("envoy.other".into(), any("t/Other", b"other"));
        HttpAccessLogEntry {
            common_properties: Some(common),
            request: Some(HttpRequestProperties {
                request_method: 3,
                path: "/v1/messages".into(),
                request_id: "5f0c2a4e".into(),
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: code.map(|value| UInt32Value { value }),
                response_body_bytes: 1_024,
                response_code_details: "via_upstream".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn reads_the_filter_state_and_response_code_of_full_envoy_entries() {
        let msg = StreamAccessLogsMessage {
            identifier: Some(Identifier {
                log_name: "tollgate".into(),
                node: None,
            }),
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                log_entry: vec![
                    full_entry(Some(413)),
                    full_entry(None),
                    HttpAccessLogEntry::default(),
                ],
            })),
        };
        let lean = LogMessage::decode(msg.encode_to_vec().as_slice()).unwrap();
        let entries = &lean.http_logs.unwrap().log_entry;
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[0].filter_state("tollgate.audit"),
            Some(&any("t/BytesValue", b"\x0a\x02{}"))
        );
        assert_eq!(
            entries[0].filter_state("envoy.other"),
            Some(&any("t/Other", b"other"))
        );
        assert_eq!(entries[0].filter_state("absent"), None);
        assert_eq!(entries[0].response_code(), Some(413));
        assert_eq!(entries[1].response_code(), None);
        assert_eq!(entries[2].filter_state("tollgate.audit"), None);
        assert_eq!(entries[2].response_code(), None);
    }

    #[test]
    fn a_map_entry_without_a_value_is_an_empty_any_and_the_last_key_wins() {
        let entry = HttpEntry {
            common_properties: Some(Common {
                filter_state_objects: vec![
                    FilterState {
                        key: "k".into(),
                        value: Some(any("first", b"1")),
                    },
                    FilterState {
                        key: "k".into(),
                        value: None,
                    },
                ],
            }),
            response: None,
        };
        assert_eq!(entry.filter_state("k"), Some(&Any::default()));
    }

    #[test]
    fn tcp_entries_are_skipped() {
        let msg = StreamAccessLogsMessage {
            identifier: None,
            log_entries: Some(LogEntries::TcpLogs(TcpAccessLogEntries {
                log_entry: vec![TcpAccessLogEntry::default()],
            })),
        };
        let lean = LogMessage::decode(msg.encode_to_vec().as_slice()).unwrap();
        assert_eq!(lean.http_logs, None);
    }
}
