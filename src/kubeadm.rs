//! kubeadm's external-CA layout: the files `kubeadm certs generate-csr` writes, the profile each
//! is signed under, where kubeadm expects the CA certificates, and its kubeconfigs filled in.

/// kubeadm `certs generate-csr` file names (relative to the input root) and their profiles.
pub const KUBEADM: [(&str, &str); 12] = [
    ("pki/apiserver.csr", "apiserver"),
    (
        "pki/apiserver-kubelet-client.csr",
        "apiserver-kubelet-client",
    ),
    ("pki/front-proxy-client.csr", "front-proxy-client"),
    ("pki/apiserver-etcd-client.csr", "apiserver-etcd-client"),
    ("pki/etcd/server.csr", "etcd-server"),
    ("pki/etcd/peer.csr", "etcd-peer"),
    ("pki/etcd/healthcheck-client.csr", "etcd-healthcheck-client"),
    ("admin.conf.csr", "admin"),
    ("super-admin.conf.csr", "super-admin"),
    ("kubelet.conf.csr", "kubelet-client"),
    ("controller-manager.conf.csr", "controller-manager"),
    ("scheduler.conf.csr", "scheduler"),
];

/// Where kubeadm expects each CA certificate when the CA key is kept outside (external CA).
pub(crate) const KUBEADM_CAS: [(&str, &str); 3] = [
    ("kubernetes-ca", "pki/ca.crt"),
    ("etcd-ca", "pki/etcd/ca.crt"),
    ("front-proxy-ca", "pki/front-proxy-ca.crt"),
];

/// Fills `client-certificate-data` and an empty `certificate-authority-data` in kubeadm's
/// partial kubeconfig (plain line edits: the file is kubeadm's own YAML, one key per line).
pub fn fill_kubeconfig(template: &str, cert_b64: &str, ca_b64: &str) -> String {
    template
        .lines()
        .map(|line| {
            let indent = &line[..line.len() - line.trim_start().len()];
            let key = line.trim_start();
            if key.starts_with("client-certificate-data:") {
                format!("{indent}client-certificate-data: {cert_b64}")
            } else if key.starts_with("certificate-authority-data:")
                && key.trim_end().ends_with(':')
                || key.trim_end() == "certificate-authority-data: \"\""
            {
                format!("{indent}certificate-authority-data: {ca_b64}")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}
