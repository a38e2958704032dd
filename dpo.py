"""
Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model"): after supervised finetuning, pairs of replies to the
same prompt, one chosen and one rejected, teach a model which of the two to prefer, without a
reward model or reinforcement learning. With log p the summed log-probability of a reply, under
the model being trained (the policy) and under the model it started from (the reference, frozen):

    reward r = beta * (log p_policy(reply) - log p_reference(reply))     (the paper's eq. 5)
    margin   = r(chosen) - r(rejected)
    loss     = -log sigmoid(margin)                                       (the paper's eq. 7)

At the start the policy is the reference: every margin is 0 and the loss ln 2 = 0.693. beta sets
how far the policy may move from the reference (the paper: 0.1 to 0.5). train.py trains with it
(dpo_beta > 0, on a dataset of pairs: prepare.py); docs/finetune.md says what to look at when the
loss stays at ln 2 or the margin explodes.

    prefs = Preferences(batches, dpo_beta, batch_size, block_size)
    prefs.reference(model, ctx, device)                 # the start's log-probabilities, once
    _, nll = model(x, y, reduction='none')              # x, y: a batch of pairs (batches.py)
    loss_sum, pairs, margin_sum, right = prefs.sums(nll, 'train', stream)
"""

import torch
import torch.nn.functional as F

from batches import draw
from lora import adapters_off


def dpo_loss(policy, reference, beta):
    """(losses, margins), each (B,), of B pairs. policy, reference: (2B,) summed log-probabilities
    of the replies under the policy and the reference, the B chosen ones first, then the B
    rejected ones, pair i's at i and B + i."""
    B = policy.size(0) // 2
    rewards = beta * (policy - reference)  # (2B,)
    margins = rewards[:B] - rewards[B:]  # (B,) chosen minus rejected
    return -F.logsigmoid(margins), margins


class Preferences:
    """A dataset of pairs (batches: its Batches) and the reference's log-probability of each of
    its replies, computed once at the start (reference()) and kept in the run's checkpoints, so
    that no second copy of the model is needed while training."""

    def __init__(self, batches, beta, batch_size, block_size):
        self.batches, self.beta, self.B, self.T = batches, beta, batch_size, block_size
        self.logps = {}  # split -> (n_pairs, 2): the reference's log p of chosen, rejected

    def pair_ids(self, split, stream):
        """The pairs a batch of stream holds: as batches.py draws them."""
        return draw(stream, self.B, self.batches.meta[f'{split}_pairs'])

    def reference(self, model, ctx, device, checkpoint=None, log=print):
        """The reference's log-probability of each reply: a resumed run's, from its checkpoint
        (dpo_reference); else model's now, at the run's start (with LoRA: its adapters off)."""
        if checkpoint is not None and 'dpo_reference' not in checkpoint:
            raise ValueError("the checkpoint resumed is no DPO run's: start DPO from it with "
                             "--init_from=PATH/TO/ITS/ckpt.pt instead of resume")
        if checkpoint is not None:
            self.logps = checkpoint['dpo_reference']
            return
        with adapters_off(model):
            self.compute(model, ctx, device)
        log(f"DPO: the reference's log-probabilities of the {len(self.logps['train']):,} train and "
            f"{len(self.logps['val']):,} val pairs, computed")

    @torch.no_grad()
    def compute(self, model, ctx, device):
        """Each reply's log-probability under model, in batches of the training batch's shape
        (so that, at the first step, the policy's are these to the last bit)."""
        model.eval()
        for split in ('train', 'val'):
            n = self.batches.meta[f'{split}_pairs']
            logps = torch.zeros(n, 2)
            for start in range(0, n, self.B):
                ids = [min(i, n - 1) for i in range(start, start + self.B)]  # the last batch filled
                x, y = self.batches.pairs(split, ids, self.T, device)
                with ctx:
                    _, nll = model(x, y, reduction='none')  # (2B * T,)
                logp = -nll.float().view(2 * self.B, self.T).sum(1).cpu()  # (2B,)
                logps[ids] = torch.stack([logp[:self.B], logp[self.B:]], dim=1)  # (B, 2)
            self.logps[split] = logps
        model.train()

    def sums(self, nll, split, stream):
        """(4,) tensor of sums over a batch of pairs from its per-token losses nll (2B * T,): the
        DPO loss (with its gradient), the pairs, their margins, the pairs the policy prefers the
        chosen reply of (margin > 0: the pair accuracy)."""
        policy = -nll.float().view(2 * self.B, self.T).sum(1)  # (2B,) log p of each reply
        ref = self.logps[split][self.pair_ids(split, stream)].to(policy.device)  # (B, 2)
        losses, margins = dpo_loss(policy, torch.cat([ref[:, 0], ref[:, 1]]), self.beta)
        return torch.stack([losses.sum(), torch.tensor(float(self.B), device=policy.device),
                            margins.detach().sum(), (margins.detach() > 0).float().sum()])
