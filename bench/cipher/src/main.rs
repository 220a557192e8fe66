//! Seconds of one core per GiB to seal `chacha20-poly1305@openssh.com` packets (32 KiB of
//! payload, as OpenSSH clients cap channel data), per implementation: aws-lc (upstream russh),
//! ring, RustCrypto's `chacha20` + `poly1305`, and OpenSSL with contexts re-keyed per packet
//! (the construction of third_party/russh's patch). Every implementation's output is first
//! compared with aws-lc's, so a row can only be fast by being right.

use std::ptr;
use std::time::Instant;

use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use openssl_sys as ffi;
use poly1305::universal_hash::KeyInit;

const PACKET: usize = 4 + 32 * 1024 + 16;
const TOTAL: usize = 4 << 30;

type Seal = Box<dyn FnMut(u32, &mut [u8]) -> [u8; 16]>;

fn aws_lc(key: [u8; 64]) -> Seal {
    let k = aws_lc_rs::aead::chacha20_poly1305_openssh::SealingKey::new(&key);
    Box::new(move |seqn, buf| {
        let mut tag = [0u8; 16];
        k.seal_in_place(seqn, buf, &mut tag);
        tag
    })
}

fn ring(key: [u8; 64]) -> Seal {
    let k = ring::aead::chacha20_poly1305_openssh::SealingKey::new(&key);
    Box::new(move |seqn, buf| {
        let mut tag = [0u8; 16];
        k.seal_in_place(seqn, buf, &mut tag);
        tag
    })
}

fn rustcrypto(key: [u8; 64]) -> Seal {
    Box::new(move |seqn, buf| {
        let nonce = u64::from(seqn).to_be_bytes();
        let mut length = chacha20::ChaCha20Legacy::new((&key[32..]).try_into().unwrap(), (&nonce).into());
        length.apply_keystream(&mut buf[..4]);
        let mut main = chacha20::ChaCha20Legacy::new((&key[..32]).try_into().unwrap(), (&nonce).into());
        let mut block = [0u8; 64];
        main.apply_keystream(&mut block);
        main.seek(64u64);
        main.apply_keystream(&mut buf[4..]);
        let mac = poly1305::Poly1305::new((&block[..32]).try_into().unwrap());
        mac.compute_unpadded(buf).into()
    })
}

fn openssl(key: [u8; 64]) -> Seal {
    let mut main = CipherCtx::new().unwrap();
    main.encrypt_init(Some(Cipher::chacha20()), Some(&key[..32]), None).unwrap();
    let mut length = CipherCtx::new().unwrap();
    length.encrypt_init(Some(Cipher::chacha20()), Some(&key[32..]), None).unwrap();
    // SAFETY: plain constructor calls, checked for NULL; the contexts live as long as the closure
    // (leaked at exit, this is a benchmark).
    let mac = unsafe {
        let m = ffi::EVP_MAC_fetch(ptr::null_mut(), c"POLY1305".as_ptr(), ptr::null());
        assert!(!m.is_null(), "OpenSSL has no Poly1305");
        let ctx = ffi::EVP_MAC_CTX_new(m);
        assert!(!ctx.is_null());
        ctx
    };
    Box::new(move |seqn, buf| {
        let mut iv = [0u8; 16];
        iv[8..].copy_from_slice(&u64::from(seqn).to_be_bytes());
        length.encrypt_init(None, None, Some(&iv)).unwrap();
        length.cipher_update_inplace(&mut buf[..4], 4).unwrap();
        let mut block = [0u8; 64];
        main.encrypt_init(None, None, Some(&iv)).unwrap();
        main.cipher_update_inplace(&mut block, 64).unwrap();
        let n = buf.len() - 4;
        main.cipher_update_inplace(&mut buf[4..], n).unwrap();
        let mut tag = [0u8; 16];
        let mut len = 0usize;
        // SAFETY: `mac` is live; pointers and lengths come from slices.
        unsafe {
            assert_eq!(ffi::EVP_MAC_init(mac, block.as_ptr(), 32, ptr::null()), 1);
            assert_eq!(ffi::EVP_MAC_update(mac, buf.as_ptr(), buf.len()), 1);
            assert_eq!(ffi::EVP_MAC_final(mac, tag.as_mut_ptr(), &mut len, 16), 1);
        }
        tag
    })
}

fn main() {
    let key: [u8; 64] = std::array::from_fn(|i| (i * 7 + 1) as u8);
    let rows: [(&str, fn([u8; 64]) -> Seal); 4] = [
        ("aws-lc (upstream russh)", aws_lc),
        ("ring", ring),
        ("RustCrypto chacha20 0.10 + poly1305 0.9", rustcrypto),
        ("OpenSSL, re-keyed per packet (the patch)", openssl),
    ];
    let mut reference = aws_lc(key);
    println!("| implementation | s/GiB (one core) |");
    println!("|---|---|");
    for (name, make) in rows {
        let mut seal = make(key);
        for seqn in [0u32, 7, u32::MAX] {
            let plain: Vec<u8> = (0..PACKET - 16).map(|i| (i * 13) as u8).collect();
            let (mut a, mut b) = (plain.clone(), plain);
            assert_eq!(seal(seqn, &mut a), reference(seqn, &mut b), "{name}: tag differs");
            assert_eq!(a, b, "{name}: ciphertext differs");
        }
        let mut buf = vec![0x5au8; PACKET - 16];
        let n = TOTAL / buf.len();
        let t = Instant::now();
        for i in 0..n {
            std::hint::black_box(seal(i as u32, &mut buf));
        }
        let gib = (n * buf.len()) as f64 / (1u64 << 30) as f64;
        println!("| {name} | {:.2} |", t.elapsed().as_secs_f64() / gib);
    }
}
