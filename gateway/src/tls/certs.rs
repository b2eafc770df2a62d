//! The client port's certificate: the PEM pair loaded at start, the resolver every
//! new handshake asks, and its reload (SIGHUP, or the files' contents changing). A
//! reload swaps what new handshakes get; established sessions keep theirs. A bad new
//! pair is reported once (log and counter) and the old one kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::metrics as m;

/// The contents of both files as last read, or why they could not be read.
type Seen = Result<(Vec<u8>, Vec<u8>), String>;

/// The certificate new handshakes get, and where it comes from.
pub struct Certs {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    /// The pair in use and its certificate's notAfter (Unix seconds).
    current: parking_lot::RwLock<(Arc<CertifiedKey>, i64)>,
    /// What the files held at the last attempt, loaded or not: an attempt is made (and
    /// a failure reported) once per change, not at every poll.
    seen: parking_lot::Mutex<Seen>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs").field("cert", &self.cert_path).field("key", &self.key_path).finish_non_exhaustive()
    }
}

/// What a reload attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files hold what was tried last (loaded, or already reported as bad).
    Unchanged,
    /// A new pair is in use; its certificate expires at this Unix time.
    Loaded { not_after: i64 },
    /// The new contents are unusable; the old pair stays.
    Failed(String),
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().0.clone())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn read_both(cert: &Path, key: &Path) -> Seen {
    Ok((read(cert)?, read(key)?))
}

impl Certs {
    /// Loads the pair at start; the error is the one line the binary prints.
    pub fn load(cert_path: &Path, key_path: &Path, provider: Arc<CryptoProvider>) -> Result<Self, String> {
        let seen = read_both(cert_path, key_path);
        let (cert, key) = seen.clone()?;
        let (certified, not_after) = parse(cert_path, &cert, key_path, &key, &provider)?;
        Ok(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            provider,
            current: parking_lot::RwLock::new((Arc::new(certified), not_after)),
            seen: parking_lot::Mutex::new(seen),
        })
    }

    /// The certificate (chain) new handshakes present.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().0.clone()
    }

    /// Sets the expiry gauge and logs the pair in use (at start, once metrics are installed).
    pub fn report(&self) {
        let not_after = self.current.read().1;
        metrics::gauge!(m::TLS_CERT_EXPIRY).set(not_after as f64);
        tracing::info!(
            cert = %self.cert_path.display(),
            not_after,
            expires_in_days = (not_after - unix_now()) / 86_400,
            "client-port certificate in use"
        );
    }

    /// Loads the files again if their contents changed since the last attempt (or
    /// always, when `forced`: SIGHUP), and reports the outcome once.
    pub fn reload(&self, forced: bool) -> Reload {
        let now = read_both(&self.cert_path, &self.key_path);
        {
            let mut seen = self.seen.lock();
            if !forced && *seen == now {
                return Reload::Unchanged;
            }
            *seen = now.clone();
        }
        let outcome = now.and_then(|(cert, key)| parse(&self.cert_path, &cert, &self.key_path, &key, &self.provider));
        match outcome {
            Ok((certified, not_after)) => {
                *self.current.write() = (Arc::new(certified), not_after);
                metrics::counter!(m::TLS_CERT_RELOADS, "outcome" => "loaded").increment(1);
                self.report();
                Reload::Loaded { not_after }
            }
            Err(error) => {
                metrics::counter!(m::TLS_CERT_RELOADS, "outcome" => "failed").increment(1);
                tracing::error!(%error, "new client-port certificate refused; the previous one stays in use");
                Reload::Failed(error)
            }
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A usable pair: a chain whose first certificate matches the key and has not expired.
fn parse(
    cert_path: &Path,
    cert: &[u8],
    key_path: &Path,
    key: &[u8],
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, i64), String> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM in {}: {e}", cert_path.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("no certificate in {}", cert_path.display()));
    };
    let not_after =
        not_after(leaf).ok_or_else(|| format!("cannot read the certificate in {} (not X.509)", cert_path.display()))?;
    if not_after <= unix_now() {
        return Err(format!("the certificate in {} expired (notAfter {not_after})", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| format!("no usable private key in {}: {e}", key_path.display()))?;
    let certified = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| format!("{} and {} are not a pair: {e}", cert_path.display(), key_path.display()))?;
    Ok((certified, not_after))
}

/// One DER element: its tag, its contents, and what follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&len, rest) = rest.split_first()?;
    let (len, rest) = if len < 0x80 {
        (len as usize, rest)
    } else {
        let n = (len & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |acc, b| acc << 8 | *b as usize), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The `notAfter` of an X.509 certificate as Unix seconds (RFC 5280 §4.1: Certificate ⊃
/// TBSCertificate ⊃ [0] version, serial, signature, issuer, validity).
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (0x30, cert, _) = element(der)? else { return None };
    let (0x30, tbs, _) = element(cert)? else { return None };
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = element(rest)?.2;
    }
    for _ in 0..3 {
        rest = element(rest)?.2; // serial, signature algorithm, issuer
    }
    let (0x30, validity, _) = element(rest)? else { return None };
    let after = element(validity)?.2; // past notBefore
    let (tag, time, _) = element(after)?;
    let time = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if time.len() == 12 => {
            let yy: i64 = time[..2].parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &time[2..])
        }
        0x18 if time.len() == 14 => (time[..4].parse().ok()?, &time[4..]),
        _ => return None,
    };
    let field = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day, h, min, s) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + min * 60 + s)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(not_after: (i32, u8, u8)) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn reads_not_after_in_utc_and_generalized_time() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        // 2031-05-06T00:00:00Z (UTCTime) and 2051-01-02 (GeneralizedTime from 2050 on).
        assert_eq!(not_after(&der(&pair((2031, 5, 6)).0)), Some(1_935_792_000));
        assert_eq!(not_after(&der(&pair((2051, 1, 2)).0)), Some(2_556_230_400));
        assert_eq!(not_after(b"\x30\x03\x02\x01\x01"), None);
        assert_eq!(not_after(b""), None);
    }

    #[test]
    fn a_bad_new_pair_is_reported_once_and_the_old_one_kept() {
        let dir = std::env::temp_dir().join(format!("sb-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        let (a, a_key) = pair((2040, 1, 1));
        std::fs::write(&cert, &a).unwrap();
        std::fs::write(&key, &a_key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = Certs::load(&cert, &key, provider.clone()).unwrap();
        assert_eq!(certs.reload(false), Reload::Unchanged);

        // A certificate whose key is another's: refused, once; A stays.
        let (b, b_key) = pair((2041, 1, 1));
        std::fs::write(&cert, &b).unwrap();
        assert!(matches!(certs.reload(false), Reload::Failed(e) if e.contains("not a pair")));
        assert_eq!(certs.reload(false), Reload::Unchanged, "reported once");
        assert_eq!(certs.current().cert[0], der(&a));
        // Its key arrives: B is loaded.
        std::fs::write(&key, &b_key).unwrap();
        assert!(matches!(certs.reload(false), Reload::Loaded { .. }));
        assert_eq!(certs.current().cert[0], der(&b));

        // At start, a mismatched pair, a missing file, an expired certificate, no key: one line each.
        let mut errors = Vec::new();
        std::fs::write(&key, &a_key).unwrap();
        errors.push((Certs::load(&cert, &key, provider.clone()).unwrap_err(), "are not a pair"));
        errors.push((Certs::load(&dir.join("none.pem"), &key, provider.clone()).unwrap_err(), "none.pem"));
        let (old, old_key) = pair((2001, 1, 1));
        std::fs::write(&cert, old).unwrap();
        std::fs::write(&key, old_key).unwrap();
        errors.push((Certs::load(&cert, &key, provider.clone()).unwrap_err(), "expired"));
        std::fs::write(&key, "not a key").unwrap();
        std::fs::write(&cert, &a).unwrap();
        errors.push((Certs::load(&cert, &key, provider).unwrap_err(), "no usable private key"));
        for (e, want) in errors {
            assert!(e.contains(want) && !e.contains('\n'), "one line naming {want}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
