# One image with both programs: mailroute-relay (the entrypoint) and mailroute-operator.
# Build: docker build -t mailroute:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p mailroute-relay -p mailroute-operator \
 && strip target/release/mailroute-relay target/release/mailroute-operator

# Distroless: no shell, no package manager; runs as the unprivileged "nonroot" user (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/mailroute-relay /src/target/release/mailroute-operator /usr/local/bin/
USER 65532:65532
# Unprivileged ports; the chart's Service maps 25, 587 and 465 onto them.
EXPOSE 2525 2587 2465 9090
ENTRYPOINT ["/usr/local/bin/mailroute-relay"]
