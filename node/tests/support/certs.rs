//! Certificates made in a test (rcgen): a CA and the certificates it signs, as PEM. Included
//! with `#[path]` by the tests that run nodes over TLS; not a test target itself.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A CA that signs certificates for tests.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Self { issuer: Issuer::new(params, key), pem })
    }

    /// A certificate for `names` (IP addresses or DNS names) and its key, as PEM.
    pub fn sign(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let key = KeyPair::generate()?;
        Ok((params.signed_by(&key, &self.issuer)?.pem(), key.serialize_pem()))
    }

    /// As [`Ca::sign`], with the serial number `serial` (to revoke it by).
    pub fn sign_serial(&self, names: &[&str], serial: u64) -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        let key = KeyPair::generate()?;
        Ok((params.signed_by(&key, &self.issuer)?.pem(), key.serialize_pem()))
    }

    /// A certificate revocation list (PEM) revoking the certificates with the serials `revoked`.
    pub fn crl(&self, number: u64, revoked: &[u64]) -> anyhow::Result<String> {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*serial),
                    revocation_time: rcgen::date_time_ymd(2025, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    pub fn write(&self, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem)?;
        Ok(path)
    }
}

/// TLS files for a local cluster's API port, written under `dir`: a CA, and one certificate for
/// every node naming 127.0.0.1 and localhost.
pub fn api_tls(dir: &Path) -> anyhow::Result<maos_testkit::local_cluster::TlsFiles> {
    let ca = Ca::new("maos test CA")?;
    let (cert, key) = ca.sign(&["127.0.0.1", "localhost"])?;
    let files = maos_testkit::local_cluster::TlsFiles {
        cert_file: dir.join("node.pem"),
        key_file: dir.join("node.key"),
        ca_file: ca.write(dir, "ca.pem")?,
        ..Default::default()
    };
    std::fs::write(&files.cert_file, cert)?;
    std::fs::write(&files.key_file, key)?;
    Ok(files)
}
