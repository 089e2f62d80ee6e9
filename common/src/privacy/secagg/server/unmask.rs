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
        for (o, s) in response.self_mask_shares {
            self.b_shares.entry(o).or_default().push(Zeroizing::new(s));
        }
        for (o, s) in response.pairwise_shares {
            self.sk_shares.entry(o).or_default().push(Zeroizing::new(s));
        }
        Ok(())
    }

    /// Closes stage 4: recovers every needed seed (aborting, with the sum
    /// unread, if any owner has fewer than t shares), removes the masks and
    /// decodes (refusing, with the sum seen, a sum out of the round's
    /// bounds: [`SecAggError::revealed_sum_of`]). Cost: one PRG per survivor plus one per (dropped agent,
    /// surviving neighbour) pair, spread over rayon threads.
    pub fn finish(mut self) -> Result<SecAggOutput, SecAggError> {
        self.expect(Stage::Unmask)?;
        let masks = match self.recover_masks() {
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
        let decoded = DecodedSum::decode(&self.config, &sum, survivors.len())?;
        Ok(SecAggOutput {
            raw_sum: sum,
            sum: decoded,
            survivors,
            dropped,
        })
    }

    /// The seeds to remove: minus each survivor's self mask, and for each
    /// dropped agent the opposite of every pairwise mask its surviving
    /// neighbours added.
    fn recover_masks(&self) -> Result<Vec<crypto::Mask>, SecAggError> {
        let t = self.config.threshold;
        let none = Vec::new();
        let survivors: Vec<u32> = self.survivors.iter().copied().collect();
        let dropped: Vec<u32> = self
            .uploads
            .keys()
            .copied()
            .filter(|o| !self.survivors.contains(o))
            .collect();
        let mut masks: Vec<crypto::Mask> = survivors
            .par_iter()
            .map(|&u| {
                let b = crypto::recover(t, self.b_shares.get(&u).unwrap_or(&none), u)?;
                Ok((*b, Sign::Minus))
            })
            .collect::<Result<_, SecAggError>>()?;
        let pairwise: Vec<Vec<crypto::Mask>> = dropped
            .par_iter()
            .map(|&v| {
                let sk_bytes = crypto::recover(t, self.sk_shares.get(&v).unwrap_or(&none), v)?;
                let sk = crypto::SecretKey::from_bytes(*sk_bytes);
                if sk.public_key() != self.keys[&v].mask_pk {
                    return Err(SecAggError::KeyMismatch { agent: v });
                }
                self.graph()
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
                    .collect()
            })
            .collect::<Result<_, SecAggError>>()?;
        masks.extend(pairwise.into_iter().flatten());
        Ok(masks)
    }
}
