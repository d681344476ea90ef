"""Provisioning: the federation's PKI, keys, roster, Mosquitto configuration and ACL, member
bundles and Kubernetes Secrets."""
