"""Point-of-care inference: ONNX Runtime over the intake's preprocessing, from the command line
and over HTTP."""

INFERENCE_PORT = 8443  # the deployment constant: HTTPS, beside the health server's 8080
# Why a listener off loopback is refused, and the fix (`node.inference.http.ServeConfig`).
OFF_LOOPBACK_FIX = (
    "a listener other machines can reach needs TLS and a client credential: a certificate "
    "and key (node.toml [inference] tls_cert and tls_key; `tessera node serve --tls-cert "
    "--tls-key`) and the SHA-256 of a bearer token ([inference] token_sha256_file; "
    "--token-sha256-file), or bind it to 127.0.0.1"
)
