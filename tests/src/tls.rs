//! A throw-away PKI for mutual-TLS tests: a CA, one service certificate for
//! 127.0.0.1/localhost signed by it (every service presents it, as server and
//! as client), and an unrelated CA's certificate that must be refused.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// PEM files in a temporary directory (removed on drop).
#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    Ca { cert: params.self_signed(&key).expect("self-signed"), key }
}

fn leaf(ca: &Ca) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = params.signed_by(&key, &ca.cert, &ca.key).expect("signed");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    /// Writes `ca.pem`, `node.pem`/`node.key` (signed by the CA) and `rogue.pem`/`rogue.key`
    /// (signed by another CA).
    pub fn generate() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("switchboard-pki-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let good = ca("switchboard test CA");
        let rogue = ca("someone else's CA");
        let (node, node_key) = leaf(&good);
        let (other, other_key) = leaf(&rogue);
        for (name, pem) in [
            ("ca.pem", good.cert.pem()),
            ("node.pem", node),
            ("node.key", node_key),
            ("rogue.pem", other),
            ("rogue.key", other_key),
        ] {
            std::fs::write(dir.join(name), pem).expect("write pem");
        }
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The `--internal-tls-*` flags every service gets.
    pub fn args(&self) -> Vec<String> {
        let p = |n: &str| self.path(n).display().to_string();
        vec![
            "--internal-tls-cert".into(),
            p("node.pem"),
            "--internal-tls-key".into(),
            p("node.key"),
            "--internal-tls-ca".into(),
            p("ca.pem"),
        ]
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).expect("pem")
    }

    /// A client channel to `url` that trusts our CA and presents `identity`
    /// (`Some("node")`, `Some("rogue")`) or no certificate at all (`None`).
    pub fn channel(&self, url: &str, identity: Option<&str>) -> Channel {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.read("ca.pem")));
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(self.read(&format!("{id}.pem")), self.read(&format!("{id}.key"))));
        }
        Endpoint::from_shared(url.to_owned()).expect("url").tls_config(tls).expect("tls").connect_lazy()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
