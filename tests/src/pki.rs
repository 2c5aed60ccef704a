//! Certificates made for a test: a CA, servers' certificates for
//! 127.0.0.1 it signed (Envoy's mTLS listener, a TLS Redis), and clients'.
#![allow(clippy::unwrap_used)]

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use std::path::Path;

/// A CA, a server certificate for 127.0.0.1 it signed, and a way to sign
/// client certificates with a SPIFFE URI SAN.
pub struct Pki {
    pub ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "tollgate e2e CA");
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    /// (certificate PEM, key PEM)
    pub fn leaf(&self, san: SanType, purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![san];
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA and the server's certificate and key into `dir`.
    pub fn server_files(&self, dir: &Path) {
        let (cert, key) = self.leaf(
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        std::fs::write(dir.join("ca.pem"), self.ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), cert).unwrap();
        std::fs::write(dir.join("server.key"), key).unwrap();
    }

    /// An HTTPS client trusting the CA, presenting a certificate for
    /// `spiffe` when given.
    pub fn client(&self, spiffe: Option<&str>) -> reqwest::blocking::Client {
        let mut b = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).unwrap())
            .timeout(std::time::Duration::from_secs(30));
        if let Some(id) = spiffe {
            let (cert, key) = self.leaf(
                SanType::URI(id.try_into().unwrap()),
                ExtendedKeyUsagePurpose::ClientAuth,
            );
            b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
        }
        b.build().unwrap()
    }
}
