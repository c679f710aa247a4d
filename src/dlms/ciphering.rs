//! DLMS security suite 0 (AES-GCM-128, IEC 62056-5-3 / Green Book 9.2.7): ciphered xDLMS APDUs
//! (glo-/ded- get, set, action and initiate) and the HLS-GMAC authentication tags of pass 3/4.
//! Pure: keys, system titles and invocation counters come in, bytes come out; keeping the
//! invocation counter unique is the caller's job. Built on RustCrypto's audited `aes-gcm`.
//!
//! Ciphered APDU: tag, length, security control (0x30 = authenticated and encrypted, 0x10 =
//! authenticated only), invocation counter (4 bytes), ciphertext (or plaintext), 12-byte tag.
//! IV = system title of the sender (8) ‖ invocation counter; AAD = SC ‖ authentication key
//! (‖ plaintext when only authenticated).

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::aes::Aes128;
use aes_gcm::{AesGcm, Nonce, Tag};

/// AES-GCM-128 with DLMS's 12-byte nonce and 12-byte (truncated) tag.
type Gcm = AesGcm<Aes128, U12, U12>;

/// Security control byte: authenticated and encrypted, suite 0.
pub const SC_AUTHENTICATED_ENCRYPTED: u8 = 0x30;
/// Security control byte: authenticated only, suite 0 (HLS-GMAC tags use it).
pub const SC_AUTHENTICATED: u8 = 0x10;
/// Length of the authentication tag.
pub const TAG_LEN: usize = 12;

/// Why a ciphered APDU could not be built or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The APDU has no ciphered counterpart we know.
    #[error("apdu 0x{0:02x} has no ciphered form")]
    NoCipheredForm(u8),
    /// The ciphered APDU is truncated or its length field is wrong.
    #[error("malformed ciphered apdu")]
    Malformed,
    /// A security control byte we do not support (only suite 0, authenticated).
    #[error("unsupported security control 0x{0:02x}")]
    Security(u8),
    /// The tag does not match: wrong keys, wrong system title or a tampered APDU.
    #[error("authentication failed (wrong key or system title?)")]
    Authentication,
}

/// Security suite 0 keys. `Debug` never prints them.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    /// Global unicast encryption key (block cipher key).
    pub block_cipher: [u8; 16],
    /// Authentication key.
    pub authentication: [u8; 16],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys { *** }")
    }
}

/// The glo-ciphered tag of a plain xDLMS APDU tag (requests and responses).
pub fn glo_tag(plain: u8) -> Option<u8> {
    Some(match plain {
        0x01 => 0x21, // initiate-request
        0x08 => 0x28, // initiate-response
        0xC0 => 0xC8, // get-request
        0xC1 => 0xC9, // set-request
        0xC3 => 0xCB, // action-request
        0xC4 => 0xCC, // get-response
        0xC5 => 0xCD, // set-response
        0xC7 => 0xCF, // action-response
        _ => return None,
    })
}

/// The ded-ciphered tag (dedicated key) of a plain xDLMS APDU tag.
pub fn ded_tag(plain: u8) -> Option<u8> {
    Some(match plain {
        0xC0 => 0xD0,
        0xC1 => 0xD1,
        0xC3 => 0xD3,
        0xC4 => 0xD4,
        0xC5 => 0xD5,
        0xC7 => 0xD7,
        _ => return None,
    })
}

/// Whether `tag` is a glo- or ded-ciphered APDU tag we can open.
pub fn is_ciphered(tag: u8) -> bool {
    matches!(tag, 0x21 | 0x28 | 0xC8..=0xCF | 0xD0..=0xD7)
}

fn nonce(system_title: &[u8; 8], ic: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(system_title);
    n[8..].copy_from_slice(&ic.to_be_bytes());
    n
}

fn aad(sc: u8, ak: &[u8; 16], extra: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(17 + extra.len());
    a.push(sc);
    a.extend_from_slice(ak);
    a.extend_from_slice(extra);
    a
}

fn put_length(n: usize, out: &mut Vec<u8>) {
    if n < 0x80 {
        out.push(n as u8);
    } else if n <= 0xFF {
        out.extend_from_slice(&[0x81, n as u8]);
    } else {
        out.push(0x82);
        out.extend_from_slice(&(n.min(0xFFFF) as u16).to_be_bytes());
    }
}

fn get_length(b: &[u8]) -> Option<(usize, usize)> {
    match *b.first()? {
        n if n < 0x80 => Some((usize::from(n), 1)),
        0x81 => Some((usize::from(*b.get(1)?), 2)),
        0x82 => Some((usize::from(u16::from_be_bytes([*b.get(1)?, *b.get(2)?])), 3)),
        _ => None,
    }
}

/// Cipher `apdu` with `key` under `ciphered_tag` (from [`glo_tag`] or [`ded_tag`]), authenticated and
/// encrypted, under the sender's `system_title` and invocation counter `ic`.
pub fn encrypt(
    key: &[u8; 16],
    authentication: &[u8; 16],
    ciphered_tag: u8,
    system_title: &[u8; 8],
    ic: u32,
    apdu: &[u8],
) -> Vec<u8> {
    let gcm = Gcm::new(key.into());
    let mut body = apdu.to_vec();
    let tag = gcm
        .encrypt_in_place_detached(
            Nonce::<U12>::from_slice(&nonce(system_title, ic)),
            &aad(SC_AUTHENTICATED_ENCRYPTED, authentication, &[]),
            &mut body,
        )
        .expect("apdu far below the AES-GCM length limit");
    let mut out = Vec::with_capacity(apdu.len() + 24);
    out.push(ciphered_tag);
    put_length(1 + 4 + body.len() + TAG_LEN, &mut out);
    out.push(SC_AUTHENTICATED_ENCRYPTED);
    out.extend_from_slice(&ic.to_be_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&tag);
    out
}

/// Cipher a plain APDU with the global unicast key ([`glo_tag`] of its tag).
pub fn encrypt_glo(
    keys: &Keys,
    system_title: &[u8; 8],
    ic: u32,
    apdu: &[u8],
) -> Result<Vec<u8>, Error> {
    let plain = *apdu.first().ok_or(Error::Malformed)?;
    let tag = glo_tag(plain).ok_or(Error::NoCipheredForm(plain))?;
    Ok(encrypt(
        &keys.block_cipher,
        &keys.authentication,
        tag,
        system_title,
        ic,
        apdu,
    ))
}

/// Open a ciphered APDU sent by the peer whose system title is `sender_title`, with `key`
/// (global or dedicated). Returns the sender's invocation counter and the plain APDU.
pub fn decrypt(
    key: &[u8; 16],
    authentication: &[u8; 16],
    sender_title: &[u8; 8],
    data: &[u8],
) -> Result<(u32, Vec<u8>), Error> {
    let tag = *data.first().ok_or(Error::Malformed)?;
    if !is_ciphered(tag) {
        return Err(Error::Malformed);
    }
    let (len, used) = get_length(&data[1..]).ok_or(Error::Malformed)?;
    let body = data.get(1 + used..1 + used + len).ok_or(Error::Malformed)?;
    if body.len() != len || len < 1 + 4 + TAG_LEN {
        return Err(Error::Malformed);
    }
    let sc = body[0];
    let ic = u32::from_be_bytes([body[1], body[2], body[3], body[4]]);
    let (payload, mac) = body[5..].split_at(body.len() - 5 - TAG_LEN);
    let gcm = Gcm::new(key.into());
    let n = nonce(sender_title, ic);
    match sc {
        SC_AUTHENTICATED_ENCRYPTED => {
            let mut plain = payload.to_vec();
            gcm.decrypt_in_place_detached(
                Nonce::<U12>::from_slice(&n),
                &aad(sc, authentication, &[]),
                &mut plain,
                Tag::<U12>::from_slice(mac),
            )
            .map_err(|_| Error::Authentication)?;
            Ok((ic, plain))
        }
        SC_AUTHENTICATED => {
            let mut empty = Vec::new();
            gcm.decrypt_in_place_detached(
                Nonce::<U12>::from_slice(&n),
                &aad(sc, authentication, payload),
                &mut empty,
                Tag::<U12>::from_slice(mac),
            )
            .map_err(|_| Error::Authentication)?;
            Ok((ic, payload.to_vec()))
        }
        other => Err(Error::Security(other)),
    }
}

/// The HLS-GMAC tag over `challenge` (the peer's challenge): GMAC with AAD = 0x10 ‖ AK ‖
/// challenge, IV = our system title ‖ `ic`.
pub fn hls_gmac(keys: &Keys, system_title: &[u8; 8], ic: u32, challenge: &[u8]) -> [u8; TAG_LEN] {
    let gcm = Gcm::new((&keys.block_cipher).into());
    let mut empty = Vec::new();
    let tag = gcm
        .encrypt_in_place_detached(
            Nonce::<U12>::from_slice(&nonce(system_title, ic)),
            &aad(SC_AUTHENTICATED, &keys.authentication, challenge),
            &mut empty,
        )
        .expect("challenge far below the AES-GCM length limit");
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&tag);
    out
}

/// The pass-3 (or pass-4) answer f(challenge) = SC ‖ IC ‖ GMAC tag.
pub fn hls_response(keys: &Keys, system_title: &[u8; 8], ic: u32, challenge: &[u8]) -> Vec<u8> {
    let mut out = vec![SC_AUTHENTICATED];
    out.extend_from_slice(&ic.to_be_bytes());
    out.extend_from_slice(&hls_gmac(keys, system_title, ic, challenge));
    out
}

/// Check the peer's pass-4 answer to our `challenge`, computed under its `peer_title`.
pub fn verify_hls(
    keys: &Keys,
    peer_title: &[u8; 8],
    challenge: &[u8],
    answer: &[u8],
) -> Result<(), Error> {
    if answer.len() != 1 + 4 + TAG_LEN {
        return Err(Error::Malformed);
    }
    if answer[0] != SC_AUTHENTICATED {
        return Err(Error::Security(answer[0]));
    }
    let ic = u32::from_be_bytes([answer[1], answer[2], answer[3], answer[4]]);
    let want = hls_gmac(keys, peer_title, ic, challenge);
    // Constant-time comparison is not needed for a value the peer sent us, but cheap.
    let diff = want
        .iter()
        .zip(&answer[5..])
        .fold(0u8, |d, (a, b)| d | (a ^ b));
    if diff == 0 {
        Ok(())
    } else {
        Err(Error::Authentication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Green Book example keys and system title.
    fn keys() -> Keys {
        Keys {
            block_cipher: *b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0A\x0B\x0C\x0D\x0E\x0F",
            authentication: *b"\xD0\xD1\xD2\xD3\xD4\xD5\xD6\xD7\xD8\xD9\xDA\xDB\xDC\xDD\xDE\xDF",
        }
    }
    const TITLE: [u8; 8] = [0x4D, 0x4D, 0x4D, 0x00, 0x00, 0xBC, 0x61, 0x4E];

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Vectors computed with Gurux's own implementation (gurux-dlms 1.0.203,
    /// `GXDLMSChippering.encryptAesGcm`), an independent reference.
    #[test]
    fn glo_get_request_matches_gurux() {
        let get = hex("C001C100080000010000FF0200");
        let c = encrypt_glo(&keys(), &TITLE, 0x0123_4567, &get).expect("cipher");
        assert_eq!(
            c,
            hex("c81e30012345674113d3ff935a47566827c467bc597f9fd4fab3700dbb3bc330")
        );
        let (ic, plain) =
            decrypt(&keys().block_cipher, &keys().authentication, &TITLE, &c).expect("opens");
        assert_eq!((ic, plain), (0x0123_4567, get));
    }

    #[test]
    fn hls_gmac_matches_gurux_and_verifies() {
        let stoc = hex("4B35366B53376C73");
        assert_eq!(
            hls_gmac(&keys(), &TITLE, 1, &stoc).to_vec(),
            hex("cb34cc5a0964ee64b2043309")
        );
        let answer = hls_response(&keys(), &TITLE, 1, &stoc);
        assert_eq!(answer.len(), 17);
        verify_hls(&keys(), &TITLE, &stoc, &answer).expect("verifies");
        let mut wrong = keys();
        wrong.authentication[0] ^= 1;
        assert_eq!(
            verify_hls(&wrong, &TITLE, &stoc, &answer),
            Err(Error::Authentication)
        );
    }

    /// Gurux's client ciphered its initiate-request (AARQ user-information) under system title
    /// "ABCDEFGH", counter 100; Gurux's server its initiate-response under 4D4D4D0000BC614E.
    #[test]
    fn gurux_glo_initiate_request_and_response_open() {
        let k = keys();
        let req = hex("211f3000000064ee64d83e86d28d6bd94ae16e164ce3b611af99257e4168080357");
        let (ic, plain) =
            decrypt(&k.block_cipher, &k.authentication, b"ABCDEFGH", &req).expect("opens");
        assert_eq!(ic, 100);
        assert_eq!(plain[..5], [0x01, 0x00, 0x00, 0x00, 0x06]);
        let resp = hex("281f30000000006048a9287105610c48b05c20b21e1f8281ced174ac196a025ee6");
        let (ic, plain) =
            decrypt(&k.block_cipher, &k.authentication, &TITLE, &resp).expect("opens");
        assert_eq!(ic, 0);
        let a = crate::dlms::apdu::parse_initiate_response(&plain).expect("initiate-response");
        assert_eq!(a.dlms_version, 6);
    }

    #[test]
    fn tampering_wrong_keys_and_garbage_are_errors_not_panics() {
        let c = encrypt_glo(&keys(), &TITLE, 7, &hex("C401C1000600000001")).expect("cipher");
        let k = keys();
        let mut t = c.clone();
        t[8] ^= 1;
        assert_eq!(
            decrypt(&k.block_cipher, &k.authentication, &TITLE, &t),
            Err(Error::Authentication)
        );
        let mut other = TITLE;
        other[7] ^= 1;
        assert!(decrypt(&k.block_cipher, &k.authentication, &other, &c).is_err());
        for cut in 0..c.len() {
            assert!(decrypt(&k.block_cipher, &k.authentication, &TITLE, &c[..cut]).is_err());
        }
        assert_eq!(
            encrypt_glo(&k, &TITLE, 1, &[0x60]),
            Err(Error::NoCipheredForm(0x60))
        );
        assert!(!format!("{k:?}").contains("D0"));
    }
}
