# Multi-stage build: a release binary on a distroless, non-root base.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY web web
COPY config config
COPY benches benches
RUN cargo build --release --locked --bin switchboard

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/switchboard /usr/local/bin/switchboard
USER 65532:65532
EXPOSE 8080/tcp 3478/udp 3478/tcp 5349/tcp
ENTRYPOINT ["/usr/local/bin/switchboard"]
CMD ["--config", "/etc/switchboard/switchboard.toml"]
