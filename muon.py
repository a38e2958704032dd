"""
optimizer='muon' (train.py): Muon for the blocks' weight matrices and AdamW for the rest, stepped
together as one optimizer. model.py stays the model: its configure_optimizers(leave_out=those
matrices) gives the AdamW part; make_optimizer() here gives the matrices to Muon and joins the two
(MuonAdamW). train.py builds its optimizer with make_optimizer; test_muon.py checks it;
docs/speed.md says what it measured.
"""

import torch


def make_optimizer(model, weight_decay, learning_rate, betas, device_type, optimizer='adamw',
                   muon_learning_rate=0.02, muon_momentum=0.95, fused=True):
    """model.configure_optimizers' AdamW; for optimizer='muon' a MuonAdamW: the blocks' 2-D weight
    matrices go to Muon at muon_learning_rate (its group's 'lr_scale' the ratio of its peak to
    learning_rate, for the schedule in train.py), everything else to AdamW."""
    if optimizer == 'adamw':
        return model.configure_optimizers(weight_decay, learning_rate, betas, device_type,
                                          fused=fused)
    if optimizer != 'muon':
        raise ValueError(f"optimizer must be 'adamw' or 'muon', not '{optimizer}'")
    if not hasattr(torch.optim, 'Muon'):
        raise ValueError(f"optimizer='muon' needs torch.optim.Muon (PyTorch 2.9+), this is "
                         f"{torch.__version__}: pip install -U torch, or optimizer='adamw'")
    # Muon (Keller Jordan, kellerjordan.github.io/posts/muon, 2024): SGD with Nesterov momentum
    # whose update, per weight matrix, is orthogonalised by 5 Newton-Schulz steps, scaled by
    # sqrt(max(1, out/in)). lr 0.02, momentum 0.95 and no weight decay are the write-up's and
    # nanochat's settings (modded-nanogpt: 0.05); only hidden matrices, never the embeddings or the
    # output layer, which AdamW keeps (all three)
    blocks = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
    # in the model's order
    matrices = [p for p in model.parameters() if p.requires_grad and id(p) in blocks]
    adamw = model.configure_optimizers(weight_decay, learning_rate, betas, device_type,
                                       leave_out=matrices, fused=fused)
    muon = torch.optim.Muon(matrices, lr=muon_learning_rate, momentum=muon_momentum,
                            weight_decay=0.0)
    muon.param_groups[0]['lr_scale'] = muon_learning_rate / learning_rate if learning_rate else 0.0
    return MuonAdamW(muon, adamw)


class MuonAdamW:
    """Muon for the blocks' matrices and AdamW for the rest, stepped together, behaving as one
    torch.optim optimizer where train.py needs it: param_groups (Muon's first), step, zero_grad, and
    a state_dict in torch.optim's own format, parameters numbered across both in that order, so a
    checkpoint holds both optimizers' state in its usual 'optimizer' key and
    loads with weights_only=True."""

    def __init__(self, muon, adamw):
        self.optimizers = [muon, adamw]
        self.defaults = adamw.defaults  # train.py reads 'fused' from here

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({i + offset: s for i, s in sd['state'].items()})
            groups += [dict(g, params=[i + offset for i in g['params']])
                       for g in sd['param_groups']]
            offset += sum(len(g['params']) for g in sd['param_groups'])
        return dict(state=state, param_groups=groups)

    def load_state_dict(self, state_dict):
        groups, offset = list(state_dict['param_groups']), 0
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the saved optimizer state has {len(groups)} parameter groups, Muon "
                             f"and AdamW {len(self.param_groups)}: it was saved by another "
                             f"optimizer")
        for opt in self.optimizers:
            mine, groups = groups[:len(opt.param_groups)], groups[len(opt.param_groups):]
            n = sum(len(g['params']) for g in mine)
            opt.load_state_dict(dict(
                state={i - offset: s for i, s in state_dict['state'].items()
                       if offset <= i < offset + n},
                param_groups=[dict(g, params=[i - offset for i in g['params']]) for g in mine]))
            offset += n
