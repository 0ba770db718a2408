"""MEND: Model Editor Networks with gradient decomposition (Mitchell et al., ICLR 2022, "Fast Model Editing at
Scale", arXiv 2110.11309), as a host editor that ODEdit plugs into (method.md §2.5).

For an edited Linear W (d_out x d_in) the fine-tuning gradient of a batch is a sum of rank-1 terms,
dL/dW = sum_i delta_i u_i^T, with u_i the layer input and delta_i the gradient of the loss w.r.t. the layer
output at position i (MEND §3.1). MEND's hypernetwork g maps each pair to (u~_i, delta~_i) and edits

    W <- W - alpha_W * sum_i delta~_i u~_i^T                                  (MEND Eq. 3 / Alg. 2)

with a learned step alpha_W per edited matrix. g normalises u and delta to zero mean and unit variance
(running statistics over meta-training), concatenates them, and passes the vector through residual low-rank
MLP blocks z <- z + U relu(s_m * (V z + b) + o_m) with a scale s_m and shift o_m per edited matrix ("mode");
U starts at zero, so g starts as the identity (MEND §3.2: identity initialisation). Matrices of the same
shape share one network (EasyEdit `shared: True`).

At edit time (`apply`) one forward pass (all environments of the step merged, as `odedit.editstep` encodes
them) and the backward pass of R_rel on the IN rows yield the factors, g transforms them and the update is
written into the weights; a replay of the edited top layers then scores the objective after the edit.
`restore()` puts the weights back bit for bit.
phi_e (`editable`) is the set of edited weights; the hypernetwork is editor state, trained by
`odedit.methods.mend.train` (in process, or as the Ray Train job `jobs.train_editor`) and saved with
safetensors (`save_hypernet` / `load_hypernet`, which rejects a network trained for other modules or shapes).

Editor-training loss (MEND §3.3; EasyEdit's multimodal trainer weights): with p the pre-edit and p~ the
post-edit model,

    L = cedit * NLL_p~(IN + SE-text) + iedit * NLL_p~(SE-image) + cloc * KL(p || p~ on OUT-text + OUT-mm)

It is the host loss of the objective during meta-training, so with ODEdit on the objective adds its terms:
G = L + w_loc R_loc + w_gen R_gen + lambda * penalty, the risks taken over the hypernetwork through the edit
([INFERENCE] method.md §2.5 for meta-learned editors). Reconstruction choices, all [INFERENCE]:
  * the edit NLL covers the edit prompt and its text rephrase under `cedit` (the brief's "on the edit and its
    rephrases"), image rephrases under `iedit`; KL(pre || post) as in MEND's code, at OUT answer positions
    (the positions T-Loc/M-Loc score), full vocabulary;
  * the bottleneck activation sits between V and U so that the zero-initialised U still receives gradients
    (a relu(0) pre-activation, as a literal reading of MEND's block would give, passes none);
  * factors of all non-zero positions of the IN batch are used (MEND's code skips zero rows the same way);
  * at edit time the objective is evaluated before the update and after it; the second evaluation takes
    Eq. 13's dual step at the new phi_e, so the lambda-network follows the edits (lambda shapes MEND's edits
    through the editor-training loss only);
  * in meta-training each step is one edit episode, scored as an edit's first iteration (k = 1): lambda at the
    lambda-network's starting state, no dual step (`mend.train.EPISODE_K`; carried over 1,500 unrelated
    episodes, the dual ascent ran lambda to `odedit.lambda_cap`);
  * the update is written into the weights in place (MEND has no inner optimisation, so `apply` ignores the
    stepper factory); weights partitioned by DeepSpeed ZeRO-3 would have to be gathered first;
  * without a trained hypernetwork (`hypernet_path`), `bootstrap_steps` > 0 meta-trains in process at the
    first edit on synthetic edits drawn from the model's own vocabulary and random images
    (`mend.train.synthetic_cases`): a smoke-scale stand-in for the training split, used by the test matrix.
"""

from odedit.methods.mend.editor import MEND, MENDConfig
from odedit.methods.mend.hypernet import HYPERNET_FORMAT, FactorNet, Hypernet, LowRankBlock, MENDError

__all__ = ["HYPERNET_FORMAT", "MEND", "MENDConfig", "MENDError", "FactorNet", "Hypernet", "LowRankBlock"]
