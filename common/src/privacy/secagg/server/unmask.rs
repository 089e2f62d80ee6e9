//! The unmask stage of the server: collecting the revealed shares,
//! recovering self-mask seeds and dropped agents' pairwise keys, and removing
//! the masks from the running sum.

use rayon::prelude::*;
use zeroize::Zeroizing;

use super::{SecAggOutput, ServerSession};
use crate::privacy::secagg::client::INFO_MASK;
use crate::privacy::secagg::crypto::{self, SHARE_LEN, Sign};
use crate::privacy::secagg::encode::DecodedSum;
use crate::privacy::secagg::wire::UnmaskResponse;
use crate::privacy::secagg::{SecAggError, Stage};

impl ServerSession {
    /// Stage 4 input: one survivor's revealed shares, which must be exactly
    /// the ones requested from it (anything else is refused whole).
    pub fn on_unmask(&mut self, response: UnmaskResponse) -> Result<(), SecAggError> {
        self.expect(Stage::Unmask)?;
        let from = response.from;
        let Some(req) = self.requests.get(&from) else {
            return Err(SecAggError::UnknownAgent {
                stage: Stage::Unmask,
                agent: from,
            });
        };
        if !self.responded.insert(from) {
            return Err(SecAggError::Duplicate {
                stage: Stage::Unmask,
                agent: from,
            });
        }
        let owners = |v: &[(u32, Vec<u8>)]| v.iter().map(|(o, _)| *o).collect::<Vec<_>>();
        let well_formed = |v: &[(u32, Vec<u8>)]| v.iter().all(|(_, s)| s.len() == SHARE_LEN);
        if owners(&response.self_mask_shares) != req.self_mask_of
            || owners(&response.pairwise_shares) != req.pairwise_of
            || !well_formed(&response.self_mask_shares)
            || !well_formed(&response.pairwise_shares)
        {
            return Err(SecAggError::Refused(format!(
                "agent {from} answered other shares than requested"
            )));
        }
        // Holder i of an owner's shares was dealt x = i + 1: a share under
        // another x (a forger's, or one that would shadow an honest holder's)
        // is refused with the whole answer.
        let graph = self
            .graph
            .as_ref()
            .expect("the graph is built when the advertise stage closes");
        let holders_of = &mut self.holders_of;
        let mut x_of = |owner: u32| {
            holders_of
                .entry(owner)
                .or_insert_with(|| graph.holders(owner))
                .binary_search(&from) // sorted by id
                .ok()
                .map(|i| i + 1)
        };
        if let Some((o, s)) = response
            .self_mask_shares
            .iter()
            .chain(&response.pairwise_shares)
            .find(|(o, s)| x_of(*o) != Some(usize::from(s[0])))
        {
            return Err(SecAggError::Refused(format!(
                "agent {from} revealed a share of agent {o} under x-coordinate {}, which is not \
                 the one it was dealt",
                s[0]
            )));
        }
        for (o, s) in response.self_mask_shares {
            self.b_shares
                .entry(o)
                .or_default()
                .push((from, Zeroizing::new(s)));
        }
        for (o, s) in response.pairwise_shares {
            self.sk_shares
                .entry(o)
                .or_default()
                .push((from, Zeroizing::new(s)));
        }
        Ok(())
    }

    /// Closes stage 4: recovers every needed seed (aborting, with the sum
    /// unread, if any owner has fewer than t shares), removes the masks and
    /// decodes (refusing, with the sum seen, a sum out of the round's
    /// bounds: [`SecAggError::revealed_sum_of`]). A share revealed wrong by
    /// one holder (a malicious merchant's) is exposed by the others' shares
    /// where an owner has more than t of them: at once for a dropped
    /// agent's key, which its advertised public key verifies, and for a
    /// self-mask seed, which nothing verifies, when the sum decodes out of
    /// range (a wrong seed leaves its owner's true mask in the sum, so what
    /// was seen is still masked); the sum is then recovered without the
    /// forged shares and their senders are named
    /// ([`SecAggOutput::forged_shares`]). Cost: one PRG per survivor plus
    /// one per (dropped agent, surviving neighbour) pair, spread over rayon
    /// threads.
    pub fn finish(mut self) -> Result<SecAggOutput, SecAggError> {
        self.expect(Stage::Unmask)?;
        // In holder order, not arrival order: which t shares rebuild a
        // secret first, and so whether a forged one among them shows, no
        // longer depends on the network.
        for shares in self
            .b_shares
            .values_mut()
            .chain(self.sk_shares.values_mut())
        {
            shares.sort_by_key(|(_, s)| s[0]);
        }
        let (masks, mut forged) = match self.recover_masks(false) {
            Ok(m) => m,
            Err(e) => return Err(self.abort(e)),
        };
        let mut sum = self.sum.take().expect("the sum exists from stage 3 on").sum;
        crypto::apply_masks(&mut sum, &masks);
        let survivors: Vec<u32> = self.survivors.iter().copied().collect();
        let dropped = self
            .uploads
            .keys()
            .copied()
            .filter(|o| !self.survivors.contains(o))
            .collect();
        // The sum is unmasked from here on: a refusal below is one whose
        // sum was seen (`SecAggError::revealed_sum_of`).
        let sum = match DecodedSum::decode(&self.config, &sum, survivors.len()) {
            Ok(decoded) => (sum, decoded),
            Err(refused) => {
                // Out of range: a forged input, or a forged self-mask share
                // among the first t. Only the second shows in the shares.
                let Ok((fixed, liars)) = self.recover_masks(true) else {
                    return Err(refused);
                };
                if liars.len() == forged.len() {
                    return Err(refused);
                }
                forged = liars;
                // Back to the masked sum (the masks put back, the refused
                // path only: no copy of the sum on every round), then the
                // masks rebuilt without the forged shares removed.
                let undo: Vec<crypto::Mask> = masks
                    .iter()
                    .map(|(seed, sign)| {
                        let back = match sign {
                            Sign::Plus => Sign::Minus,
                            Sign::Minus => Sign::Plus,
                        };
                        (*seed, back)
                    })
                    .collect();
                crypto::apply_masks(&mut sum, &undo);
                crypto::apply_masks(&mut sum, &fixed);
                let decoded = DecodedSum::decode(&self.config, &sum, survivors.len())?;
                (sum, decoded)
            }
        };
        forged.sort_unstable();
        forged.dedup();
        Ok(SecAggOutput {
            raw_sum: sum.0,
            sum: sum.1,
            survivors,
            dropped,
            forged_shares: forged,
        })
    }

    /// The seeds to remove: minus each survivor's self mask, and for each
    /// dropped agent the opposite of every pairwise mask its surviving
    /// neighbours added; and the senders of shares proven wrong. A dropped
    /// agent's key is checked against its advertised key and rebuilt
    /// without a wrong share if it fails; self-mask seeds are checked
    /// against every share revealed only when `check_seeds`.
    fn recover_masks(
        &self,
        check_seeds: bool,
    ) -> Result<(Vec<crypto::Mask>, Vec<u32>), SecAggError> {
        let t = self.config.threshold;
        let none = Vec::new();
        let survivors: Vec<u32> = self.survivors.iter().copied().collect();
        let dropped: Vec<u32> = self
            .uploads
            .keys()
            .copied()
            .filter(|o| !self.survivors.contains(o))
            .collect();
        let seeds: Vec<(crypto::Mask, Option<u32>)> = survivors
            .par_iter()
            .map(|&u| {
                let shares = self.b_shares.get(&u).unwrap_or(&none);
                let (b, liar) = if check_seeds {
                    rebuild(t, shares, u)?
                } else {
                    (
                        crypto::recover_from(t, shares.iter().map(|(_, s)| s.as_slice()), u)?,
                        None,
                    )
                };
                Ok(((*b, Sign::Minus), liar))
            })
            .collect::<Result<_, SecAggError>>()?;
        let pairwise: Vec<(Vec<crypto::Mask>, Option<u32>)> = dropped
            .par_iter()
            .map(|&v| {
                let shares = self.sk_shares.get(&v).unwrap_or(&none);
                let advertised = &self.keys[&v].mask_pk;
                let fast = crypto::recover_from(t, shares.iter().map(|(_, s)| s.as_slice()), v)?;
                let (sk, liar) = match crypto::SecretKey::from_bytes(*fast) {
                    sk if sk.public_key() == *advertised => (sk, None),
                    // A wrong share among the first t: the key rebuilt
                    // without it, and only without it, is the advertised one
                    // (with t shares or fewer, no rebuild without one has
                    // enough and all fail).
                    _ => (0..shares.len())
                        .find_map(|j| {
                            let bytes = crypto::recover(t, &only(shares, Some(j)), v).ok()?;
                            let sk = crypto::SecretKey::from_bytes(*bytes);
                            (sk.public_key() == *advertised).then_some((sk, Some(shares[j].0)))
                        })
                        .ok_or(SecAggError::KeyMismatch { agent: v })?,
                };
                let masks = self
                    .graph()
                    .neighbours(v)
                    .into_iter()
                    .filter(|u| self.survivors.contains(u))
                    .map(|u| {
                        let seed = crypto::agree(
                            &sk,
                            &self.keys[&u].mask_pk,
                            &self.round_seed,
                            INFO_MASK,
                            u,
                        )?;
                        // u added +PRG if u < v, −PRG otherwise; undo it.
                        Ok((*seed, if u < v { Sign::Minus } else { Sign::Plus }))
                    })
                    .collect::<Result<_, SecAggError>>()?;
                Ok((masks, liar))
            })
            .collect::<Result<_, SecAggError>>()?;
        let mut liars = Vec::new();
        let mut masks = Vec::with_capacity(seeds.len());
        for (mask, liar) in seeds {
            masks.push(mask);
            liars.extend(liar);
        }
        for (m, liar) in pairwise {
            masks.extend(m);
            liars.extend(liar);
        }
        Ok((masks, liars))
    }
}

/// The shares of `shares` without their senders, leaving out the one at
/// `skip`.
fn only(shares: &[super::Revealed], skip: Option<usize>) -> Vec<Zeroizing<Vec<u8>>> {
    shares
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .map(|(_, (_, s))| s.clone())
        .collect()
}

/// Rebuilds `owner`'s secret from its revealed shares (distinct
/// x-coordinates, checked at [`ServerSession::on_unmask`]) when at most one
/// of them is wrong, and names the sender of the wrong one: every share must
/// lie on the polynomial that the others (at least t + 1 of them) agree on.
/// A share lies on the polynomial through t others exactly when replacing
/// any one of those t by it recovers the same secret (two polynomials of
/// degree below t that agree on t − 1 non-zero points and differ have
/// different values at 0), so each check is one more recovery. Fails when
/// the shares are consistent with no such secret (two or more wrong, or
/// too few to tell).
fn rebuild(
    t: usize,
    shares: &[super::Revealed],
    owner: u32,
) -> Result<(Zeroizing<[u8; 32]>, Option<u32>), SecAggError> {
    let m = shares.len();
    let all = only(shares, None);
    let unclear = || SecAggError::InconsistentShares { agent: owner };
    if m < t {
        return crypto::recover(t, &all, owner).map(|s| (s, None));
    }
    // Whether share `o` lies on the polynomial through the t shares `base`.
    let on = |base: &[usize], secret: &[u8; 32], o: usize| -> Result<bool, SecAggError> {
        let mut set: Vec<Zeroizing<Vec<u8>>> =
            base[..t - 1].iter().map(|&i| all[i].clone()).collect();
        set.push(all[o].clone());
        Ok(*crypto::recover(t, &set, owner)? == *secret)
    };
    let pick = |base: &[usize]| -> Result<Zeroizing<[u8; 32]>, SecAggError> {
        let set: Vec<Zeroizing<Vec<u8>>> = base.iter().map(|&i| all[i].clone()).collect();
        crypto::recover(t, &set, owner)
    };
    let base: Vec<usize> = (0..t).collect();
    let secret = pick(&base)?;
    let mut off = Vec::new();
    for o in t..m {
        if !on(&base, &secret, o)? {
            off.push(o);
        }
    }
    match off[..] {
        [] => return Ok((secret, None)),
        // The base is right when another share agrees with it.
        [o] if m - t >= 2 => return Ok((secret, Some(shares[o].0))),
        _ => {}
    }
    // The wrong share is in the base (every share outside it disagrees):
    // find the base member without which two outside shares agree, then
    // check every share against it.
    if m - t < 2 || off.len() != m - t {
        return Err(unclear());
    }
    for (b, (sender, _)) in shares.iter().enumerate().take(t) {
        let mut fixed: Vec<usize> = base.iter().copied().filter(|&i| i != b).collect();
        fixed.push(off[0]);
        let candidate = pick(&fixed)?;
        if !on(&fixed, &candidate, off[1])? {
            continue;
        }
        let mut agree = true;
        for &o in &off[1..] {
            if !on(&fixed, &candidate, o)? {
                agree = false;
                break;
            }
        }
        if agree {
            return Ok((candidate, Some(*sender)));
        }
    }
    Err(unclear())
}
