//! Node bootstrap tokens (local mode): how a mesh-node proves which node it is when it asks
//! the CA for its workloads' certificates. A token is `<node>.<HMAC-SHA256(secret, node)>`;
//! the secret lives in the CA directory (`node-token.key`, owner-only), so mesh-control checks
//! a token without keeping a list, and `mesh-control node-token <node>` mints one.
//! (On Kubernetes the node's ServiceAccount token, checked by TokenReview, takes this role.)

use std::{fs, path::Path};

use ring::{hmac, rand::SecureRandom};

const SECRET_FILE: &str = "node-token.key";

pub struct NodeTokens {
    key: hmac::Key,
}

impl NodeTokens {
    /// The token key of the CA in `dir`, created on first use.
    pub fn load_or_create(dir: &Path) -> std::io::Result<NodeTokens> {
        let path = dir.join(SECRET_FILE);
        let secret = match fs::read(&path) {
            Ok(s) if s.len() >= 32 => s,
            Ok(_) => return Err(std::io::Error::other(format!("{}: shorter than 32 bytes", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut s = vec![0u8; 32];
                ring::rand::SystemRandom::new()
                    .fill(&mut s)
                    .map_err(|_| std::io::Error::other("no randomness"))?;
                fs::create_dir_all(dir)?;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
                std::io::Write::write_all(&mut f, &s)?;
                s
            }
            Err(e) => return Err(e),
        };
        Ok(NodeTokens { key: hmac::Key::new(hmac::HMAC_SHA256, &secret) })
    }

    /// The token of `node`.
    pub fn mint(&self, node: &str) -> String {
        format!("{node}.{}", hex(hmac::sign(&self.key, node.as_bytes()).as_ref()))
    }

    /// The node a token belongs to, if it is genuine (compared in constant time).
    pub fn verify(&self, token: &str) -> Option<String> {
        let (node, tag) = token.trim().rsplit_once('.')?;
        let tag = unhex(tag)?;
        hmac::verify(&self.key, node.as_bytes(), &tag).ok()?;
        Some(node.to_string())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_node_and_cannot_be_forged_or_moved() {
        let dir = std::env::temp_dir().join(format!("nm-tokens-{}", std::process::id()));
        let tokens = NodeTokens::load_or_create(&dir).unwrap();
        let t = tokens.mint("node-a");
        assert_eq!(tokens.verify(&t).as_deref(), Some("node-a"));
        let moved = t.replacen("node-a", "node-b", 1);
        assert_eq!(tokens.verify(&moved), None, "a token for one node is no good for another");
        assert_eq!(tokens.verify("node-a.00"), None);
        assert_eq!(tokens.verify("garbage"), None);
        // The same key after a restart.
        assert_eq!(NodeTokens::load_or_create(&dir).unwrap().verify(&t).as_deref(), Some("node-a"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
