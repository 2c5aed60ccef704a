# The tollgate CLI (collector, config renderer) with tollgate.wasm inside,
# for Docker Compose and Kubernetes. Built without the `mock` feature: the
# mock provider and its fault-injection headers are a test double, not part
# of the product.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN rustup target add wasm32-wasip1 \
 && cargo build --release -p tollgate --no-default-features \
 && cargo build --target wasm32-wasip1 --profile wasm -p tollgate-filter

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY --from=build /src/target/wasm32-wasip1/wasm/tollgate_filter.wasm /usr/share/tollgate/tollgate.wasm
# The collector binds loopback by default; in a container it must listen on
# all interfaces (protect it with the network, see docs/deploy.md).
EXPOSE 9611 9613
USER 65532:65532
ENTRYPOINT ["tollgate"]
CMD ["collector", "--listen", "0.0.0.0:9611", "--http", "0.0.0.0:9613", "--db", "/data/audit.db"]
