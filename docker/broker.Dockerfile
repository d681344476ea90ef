# syntax=docker/dockerfile:1
# Tessera broker: Mosquitto 2 with the configuration that `tessera provision` generates.
#   docker build -f docker/broker.Dockerfile -t tessera/broker:0.1.0 .
# Mount the provisioned broker/ folder (mosquitto.conf, acl, ca.pem, server.pem, server.key)
# read-only at /mosquitto/config and a volume at /mosquitto/data (retained model releases and
# persistent sessions). The image carries no configuration and no key of its own.

# The base image by digest (the OCI index of eclipse-mosquitto:2.0.22, as docker-library/
# repo-info recorded it in September 2026). To move on, take the digest that
# `docker buildx imagetools inspect eclipse-mosquitto:<version>` prints.
ARG MOSQUITTO_IMAGE=eclipse-mosquitto:2.0.22@sha256:199ea8ef2e35ec2b1b37e59cfd1dbae538ed4dfa4a2251a121a52215a6248a21

# The first stage lays out the mount points, owned by the unprivileged user, so that the
# runtime stage needs no shell step. The base image's sample config (anonymous, no TLS) is
# never used: the provisioned folder is mounted over /mosquitto/config.
FROM ${MOSQUITTO_IMAGE} AS layout
RUN install -d -o 1883 -g 1883 -m 0750 /layout/mosquitto/data \
 && install -d -o 0 -g 1883 -m 0750 /layout/mosquitto/config \
 && install -d -o 1883 -g 1883 -m 0750 /layout/mosquitto/log

FROM ${MOSQUITTO_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG MOSQUITTO_IMAGE
LABEL org.opencontainers.image.title="tessera-broker" \
      org.opencontainers.image.description="Mosquitto 2 for a Tessera federation: mutual TLS on 8883, secure WebSockets on 443, generated ACL" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Tessera" \
      org.opencontainers.image.base.name="${MOSQUITTO_IMAGE}"
COPY --from=layout /layout/mosquitto /mosquitto
# 1883 is the mosquitto user of the official image. Binding 443 as non-root needs
# net.ipv4.ip_unprivileged_port_start=0 (Docker's default; set in compose and k8s explicitly).
USER 1883:1883
EXPOSE 8883 443
# No client certificate is available to a probe (mutual TLS), so the check is that the TLS
# listener is bound: port 8883 (0x22B3) in state LISTEN (0A) in the kernel's socket table.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["sh", "-c", "grep -Eq ':22B3 [0-9A-F]+:0000 0A' /proc/net/tcp /proc/net/tcp6"]
ENTRYPOINT ["/usr/sbin/mosquitto"]
CMD ["-c", "/mosquitto/config/mosquitto.conf"]
