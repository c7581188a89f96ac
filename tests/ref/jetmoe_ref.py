#!/usr/bin/python3
"""Independent PyTorch reference for JetMoE (jetmoe.c's test oracle).

Written from /work/shared/docs/jetmoe-spec.md only. Everything is plain torch
and differentiable with autograd (no in-place ops on tensors that need grad
other than index_add_ into fresh accumulators).

Module API
  default_config()                    JetMoE-8B config, HF names
  normalize_config(raw)               aliases -> HF names, defaults, validation
  param_shapes(cfg)                   ordered {name: shape}
  init_params(cfg, seed, perturb=False)
  round_params(params, dtype)         round fp32 values to BF16/F16 (kept as fp32)
  load_checkpoint(dir) -> (cfg, params)
  save_checkpoint(dir, cfg, params, dtype="F32", shards=1, tied=None)
  read_safetensors(path) / write_safetensors(path, tensors, dtypes=None)
  forward(cfg, params, tokens, labels=None, dtype=torch.float32) -> dict
  selftest() -> bool

CLI
  jetmoe_ref.py make --out DIR [--config JSON] [--seed S] [--dtype F32|BF16|F16]
                     [--shards N] [--no-perturb]
  jetmoe_ref.py forward DIR --tokens 1,5,9 --dump OUT.safetensors [--float64] [--backward]
                     [--labels 1,-100,...]
  jetmoe_ref.py selftest
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------


class ConfigError(ValueError):
    pass


def default_config():
    cfg = {
        "model_type": "jetmoe",
        "architectures": ["JetMoeForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_key_value_heads": 16,
        "kv_channels": 128,
        "intermediate_size": 5632,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 4096,
        "activation_function": "silu",
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "aux_loss_coef": 0.01,
        "z_loss_coef": 0.001,
        "initializer_range": 0.01,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg["num_attention_heads"] = cfg["num_key_value_heads"] * cfg["num_experts_per_tok"]
    return cfg


# authors' name -> HF name
ALIASES = {
    "ffn_hidden_size": "intermediate_size",
    "moe_num_experts": "num_local_experts",
    "moe_top_k": "num_experts_per_tok",
    "head_dim": "kv_channels",
}

_POS_INT = ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads",
            "kv_channels", "intermediate_size", "num_local_experts",
            "num_experts_per_tok", "max_position_embeddings")


def normalize_config(raw):
    """Map aliases to HF names, fill absent fields from default_config(),
    derive num_attention_heads and validate. Raises ConfigError naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a JSON object")
    cfg = default_config()
    del cfg["num_attention_heads"]
    given = {}
    for key, val in raw.items():
        if key in ALIASES:
            canon = ALIASES[key]
            if canon in raw and raw[canon] != val:
                raise ConfigError("config: %s=%r conflicts with its alias %s=%r"
                                  % (canon, raw[canon], key, val))
            given[canon] = val
        elif key == "rope_parameters":
            if isinstance(val, dict) and "rope_theta" in val:
                if "rope_theta" in raw and raw["rope_theta"] != val["rope_theta"]:
                    raise ConfigError("config: rope_theta conflicts with rope_parameters.rope_theta")
                given["rope_theta"] = val["rope_theta"]
        else:
            given[key] = val
    n_heads = given.pop("num_attention_heads", None)
    cfg.update(given)
    for f in _POS_INT:
        v = cfg[f]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError("config: %s must be a positive integer (got %r)" % (f, v))
    if cfg["kv_channels"] % 2:
        raise ConfigError("config: kv_channels must be even for rotate-half RoPE (got %d)"
                          % cfg["kv_channels"])
    if cfg["num_experts_per_tok"] > cfg["num_local_experts"]:
        raise ConfigError("config: num_experts_per_tok (%d) > num_local_experts (%d)"
                          % (cfg["num_experts_per_tok"], cfg["num_local_experts"]))
    derived = cfg["num_key_value_heads"] * cfg["num_experts_per_tok"]
    if n_heads is not None and n_heads != derived:
        raise ConfigError("config: num_attention_heads (%r) must equal num_key_value_heads"
                          " * num_experts_per_tok (%d)" % (n_heads, derived))
    cfg["num_attention_heads"] = derived
    for f in ("rope_theta", "rms_norm_eps"):
        v = cfg[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError("config: %s must be a positive number (got %r)" % (f, v))
        cfg[f] = float(v)
    for f in ("aux_loss_coef", "z_loss_coef", "initializer_range"):
        v = cfg[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError("config: %s must be a non-negative number (got %r)" % (f, v))
        cfg[f] = float(v)
    if cfg["activation_function"] != "silu":
        raise ConfigError("config: activation_function %r unsupported (only silu)"
                          % (cfg["activation_function"],))
    if not isinstance(cfg["tie_word_embeddings"], bool):
        raise ConfigError("config: tie_word_embeddings must be true or false")
    return cfg


def param_shapes(cfg, tied=None):
    """Ordered {name: shape} of every tensor; lm_head only when untied."""
    if tied is None:
        tied = cfg["tie_word_embeddings"]
    V, H, L = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    Hkv, D, Fw = cfg["num_key_value_heads"], cfg["kv_channels"], cfg["intermediate_size"]
    E = cfg["num_local_experts"]
    s = {"model.embed_tokens.weight": (V, H)}
    for i in range(L):
        p = "model.layers.%d." % i
        s[p + "input_layernorm.weight"] = (H,)
        s[p + "self_attention.kv_proj.weight"] = (2 * Hkv * D, H)
        s[p + "self_attention.experts.router.layer.weight"] = (E, H)
        s[p + "self_attention.experts.input_linear.weight"] = (E, Hkv * D, H)
        s[p + "self_attention.experts.output_linear.weight"] = (E, H, Hkv * D)
        s[p + "self_attention.experts.bias"] = (H,)
        s[p + "post_attention_layernorm.weight"] = (H,)
        s[p + "mlp.router.layer.weight"] = (E, H)
        s[p + "mlp.input_linear.weight"] = (E, 2 * Fw, H)
        s[p + "mlp.output_linear.weight"] = (E, H, Fw)
        s[p + "mlp.bias"] = (H,)
    s["model.norm.weight"] = (H,)
    if not tied:
        s["lm_head.weight"] = (V, H)
    return s


def init_params(cfg, seed=0, perturb=False):
    """Spec init: every matrix ~ N(0, initializer_range), norms 1, biases 0.

    perturb=True makes a test model in which every term matters:
      norm weights 1 + 0.1*N(0,1), biases 0.02*N(0,1),
      router weights N(0, 1/sqrt(H)) (router logits ~N(0,1): non-trivial routing,
      gates far from uniform), expert / kv_proj matrices N(0, 1/sqrt(fan_in))
      (queries and keys O(1): attention far from uniform, so RoPE and the causal
      mask matter), embeddings (and lm_head) N(0, 0.3).
    """
    g = torch.Generator().manual_seed(int(seed))
    std = cfg["initializer_range"]
    params = {}
    for name, shape in param_shapes(cfg).items():
        r = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t = 1.0 + 0.1 * r if perturb else torch.ones(shape)
        elif name.endswith(".bias"):
            t = 0.02 * r if perturb else torch.zeros(shape)
        elif not perturb:
            t = std * r
        elif "router" in name:
            t = r / math.sqrt(cfg["hidden_size"])
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = 0.3 * r
        else:
            t = r / math.sqrt(shape[-1])      # 1/sqrt(fan_in)
        params[name] = t.contiguous()
    return params


# ----------------------------------------------------------------------------
# BF16 / F16 rounding and safetensors I/O (numpy + struct + json)
# ----------------------------------------------------------------------------

_DT_SIZE = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "F64": 8, "I64": 8}
_DT_NP = {"F32": "<f4", "F16": "<f2", "I32": "<i4", "F64": "<f8", "I64": "<i8", "BF16": "<u2"}


def f32_to_bf16_bits(a):
    """fp32 array -> uint16 BF16 bits, round-to-nearest-even; NaN stays NaN."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    lsb = (u >> 16) & 1
    r = ((u + 0x7FFF + lsb) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def bf16_bits_to_f32(b):
    b = np.ascontiguousarray(b, dtype=np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32)


def round_to_dtype(a, dtype):
    """fp32 numpy array -> fp32 values exactly representable in dtype."""
    if dtype == "F32":
        return np.asarray(a, dtype=np.float32)
    if dtype == "BF16":
        return bf16_bits_to_f32(f32_to_bf16_bits(a))
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)
    raise ValueError("unsupported dtype %r" % dtype)


def round_params(params, dtype):
    return {k: torch.from_numpy(round_to_dtype(v.detach().float().numpy(), dtype))
            for k, v in params.items()}


def _encode(arr, dtype):
    if dtype == "BF16":
        return f32_to_bf16_bits(np.asarray(arr, dtype=np.float32)).astype("<u2").tobytes()
    return np.ascontiguousarray(arr, dtype=_DT_NP[dtype]).tobytes()


def write_safetensors(path, tensors, dtypes=None, metadata=None):
    """tensors: {name: numpy array or torch tensor}; dtypes: {name: "F32"|...}
    (default F32 for floating, I32 for integer). Tensors are laid out largest
    element size first so every tensor is aligned to its element size."""
    items = []
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().numpy()
        t = np.asarray(t)
        dt = (dtypes or {}).get(name)
        if dt is None:
            dt = "I32" if np.issubdtype(t.dtype, np.integer) else "F32"
        items.append((name, dt, t))
    items.sort(key=lambda x: -_DT_SIZE[x[1]])  # stable: keeps given order per size
    header = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, off = [], 0
    for name, dt, t in items:
        b = _encode(t, dt)
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((-len(hj)) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
    return off


def read_safetensors(path, names=None):
    """-> {name: fp32 numpy array (F32/BF16/F16/F64) or int array (I32/I64)}."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        hdr = f.read(8)
        if len(hdr) != 8:
            raise ValueError("%s: truncated safetensors header" % path)
        (n,) = struct.unpack("<Q", hdr)
        if n > size - 8 or n > 100 << 20:
            raise ValueError("%s: bad safetensors header length %d" % (path, n))
        header = json.loads(f.read(n).decode("utf-8"))
    base = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if names is not None and name not in names:
            continue
        dt, shape, (b, en) = e["dtype"], e["shape"], e["data_offsets"]
        if dt not in _DT_SIZE:
            raise ValueError("%s: tensor %s has unsupported dtype %s" % (path, name, dt))
        cnt = int(np.prod(shape)) if shape else 1
        if not (0 <= b <= en <= size - base) or en - b != cnt * _DT_SIZE[dt]:
            raise ValueError("%s: tensor %s has bad data_offsets" % (path, name))
        raw = np.frombuffer(mm[base + b: base + en].tobytes(), dtype=_DT_NP[dt])
        if dt == "BF16":
            arr = bf16_bits_to_f32(raw)
        elif dt in ("F16", "F32", "F64"):
            arr = raw.astype(np.float32)
        else:
            arr = raw.copy()
        out[name] = arr.reshape(shape)
    return out


def _shard_name(i, n):
    return "model-%05d-of-%05d.safetensors" % (i + 1, n)


def save_checkpoint(d, cfg, params, dtype="F32", shards=1, tied=None):
    """Write config.json (HF names) and model.safetensors, or shards + index."""
    if dtype not in ("F32", "BF16", "F16"):
        raise ValueError("dtype must be F32, BF16 or F16")
    if tied is None:
        tied = cfg["tie_word_embeddings"]
    cfg = dict(cfg)
    cfg["tie_word_embeddings"] = bool(tied)
    cfg["torch_dtype"] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype]
    os.makedirs(d, exist_ok=True)
    names = list(param_shapes(cfg, tied).keys())
    tensors = {}
    for nm in names:
        t = params.get(nm)
        if t is None and nm == "lm_head.weight":
            t = params["model.embed_tokens.weight"]
        tensors[nm] = t.detach().float().cpu().numpy()
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    dts = {nm: dtype for nm in names}
    if shards <= 1:
        write_safetensors(os.path.join(d, "model.safetensors"), tensors, dts,
                          metadata={"format": "pt"})
        return
    if shards > len(names):
        raise ValueError("more shards than tensors")
    sizes = [tensors[nm].size * _DT_SIZE[dtype] for nm in names]
    total = sum(sizes)
    groups, cum, s = [[] for _ in range(shards)], 0, 0
    for i, nm in enumerate(names):
        groups[s].append(nm)
        cum += sizes[i]
        left_t, left_s = len(names) - i - 1, shards - 1 - s
        if left_s > 0 and (left_t == left_s or (cum * shards >= (s + 1) * total and left_t >= left_s)):
            s += 1
    weight_map = {}
    for i, g in enumerate(groups):
        fn = _shard_name(i, shards)
        write_safetensors(os.path.join(d, fn), {nm: tensors[nm] for nm in g}, dts,
                          metadata={"format": "pt"})
        for nm in g:
            weight_map[nm] = fn
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")


def load_checkpoint(d):
    """-> (cfg, params) with params fp32 torch tensors (lm_head only if untied)."""
    with open(os.path.join(d, "config.json")) as f:
        cfg = normalize_config(json.load(f))
    single = os.path.join(d, "model.safetensors")
    index = os.path.join(d, "model.safetensors.index.json")
    arrays = {}
    if os.path.exists(single):
        arrays = read_safetensors(single)
    elif os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        files = {}
        for nm, fn in wm.items():
            files.setdefault(fn, set()).add(nm)
        for fn, nms in files.items():
            arrays.update(read_safetensors(os.path.join(d, fn), nms))
    else:
        raise FileNotFoundError("%s: no model.safetensors or model.safetensors.index.json" % d)
    params = {}
    for nm, shape in param_shapes(cfg).items():
        if nm not in arrays:
            raise ValueError("%s: missing tensor %s" % (d, nm))
        a = arrays[nm]
        if tuple(a.shape) != tuple(shape):
            raise ValueError("%s: tensor %s has shape %s, expected %s"
                             % (d, nm, list(a.shape), list(shape)))
        params[nm] = torch.from_numpy(np.array(a, dtype=np.float32))
    return cfg, params


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


def rmsnorm(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_cos_sin(T, D, theta, dtype):
    """cos, sin of shape (T, D/2); angles computed in float64 then cast."""
    i = torch.arange(D // 2, dtype=torch.float64)
    inv_freq = torch.pow(torch.tensor(float(theta), dtype=torch.float64), -2.0 * i / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half over the last dim; cos/sin broadcast against x[..., :D/2]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def route(a, w_router, k):
    """-> z (N,E), idx (N,k) descending with ties lower index first, gates (N,k)."""
    z = a @ w_router.t()
    # stable ascending sort of -z == descending z with ties broken by lower index
    order = torch.sort(-z.detach(), dim=-1, stable=True)[1]
    idx = order[:, :k].contiguous()
    gates = torch.softmax(torch.gather(z, 1, idx), dim=-1)
    return z, idx, gates


def router_losses(z, idx, E):
    """(switch, zloss) of one router over all N tokens."""
    P = torch.softmax(z, dim=-1).sum(0)
    f = torch.bincount(idx.reshape(-1), minlength=E).to(z.dtype)
    switch = E * torch.sum((P / P.sum()) * (f / f.sum()))
    zl = torch.logsumexp(z, dim=-1).pow(2).mean()
    return switch, zl


def _groups(idx, E):
    """Per expert with any pairs: (e, pos, tok) where pos are the flat
    (token*k + slot) pair indices routed to e and tok their token rows."""
    k = idx.shape[-1]
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True)[1]
    counts = torch.bincount(flat, minlength=E).tolist()
    start = 0
    for e in range(E):
        c = counts[e]
        if c:
            pos = order[start:start + c]
            yield e, pos, torch.div(pos, k, rounding_mode="floor")
        start += c


def _same(t):
    return t


def bf16_inputs(t):
    """t rounded to BF16 (to nearest even), kept in its dtype: the inputs of a BF16 matrix used in place."""
    return t.to(torch.bfloat16).to(t.dtype)


def moe(a, idx, gates, w_in, w_out, bias, act=_same):
    """a (N,H); idx, gates (N,k); w_in (E,2F,H); w_out (E,H,F); act: what each matrix's inputs become."""
    N, k = idx.shape
    E, twoF = w_in.shape[0], w_in.shape[1]
    Fw = twoF // 2
    gflat = gates.reshape(-1)
    out = torch.zeros(N, a.shape[1], dtype=a.dtype)
    for e, pos, tok in _groups(idx, E):
        u = act(a.index_select(0, tok)) @ w_in[e].t()
        h = F.silu(u[:, :Fw]) * u[:, Fw:]
        y = (act(h) @ w_out[e].t()) * gflat.index_select(0, pos)[:, None]
        out.index_add_(0, tok, y)
    return out + bias


def moa(a, B, T, idx, gates, kv_w, w_in, w_out, bias, Hkv, D, cos, sin, act=_same):
    """a (N=B*T, H) rows ordered b*T+t; idx, gates (N,k); kv_w (2*Hkv*D, H);
    w_in (E, Hkv*D, H); w_out (E, H, Hkv*D); cos/sin (T, D/2); act: what each matrix's inputs become."""
    N, k = idx.shape
    E = w_in.shape[0]
    HD = Hkv * D
    kv = act(a) @ kv_w.t()
    K = kv[:, :HD].reshape(B, T, Hkv, D)
    V = kv[:, HD:].reshape(B, T, Hkv, D)
    # queries, grouped per expert, then put back in (token, slot) order
    Q = torch.zeros(N * k, HD, dtype=a.dtype)          # (N*k, HD), row n*k+j
    for e, pos, tok in _groups(idx, E):
        Q = Q.index_copy(0, pos, act(a.index_select(0, tok)) @ w_in[e].t())
    Q = Q.reshape(B, T, k, Hkv, D)
    Q = apply_rope(Q, cos[None, :, None, None, :], sin[None, :, None, None, :])
    K = apply_rope(K, cos[None, :, None, :], sin[None, :, None, :])
    # query head (j,h) uses KV head h: fold slots into the query-length axis
    Qh = Q.permute(0, 3, 2, 1, 4).reshape(B * Hkv, k * T, D)   # row j*T + t
    Kt = K.permute(0, 2, 3, 1).reshape(B * Hkv, D, T)
    Vh = V.permute(0, 2, 1, 3).reshape(B * Hkv, T, D)
    # additive causal mask (0 / -inf), rows j*T+t may see keys s <= t
    mask = torch.zeros(T, T, dtype=a.dtype).masked_fill(
        torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).repeat(k, 1)
    s = torch.baddbmm(mask, Qh, Kt, alpha=1.0 / math.sqrt(D))  # mask + (Q K^T)/sqrt(D)
    p = torch.softmax(s, dim=-1)
    O = torch.bmm(p, Vh)                                       # (B*Hkv, kT, D)
    O = O.reshape(B, Hkv, k, T, D).permute(0, 3, 2, 1, 4).reshape(N * k, HD)
    out = torch.zeros(N, a.shape[1], dtype=a.dtype)
    gflat = gates.reshape(-1)
    for e, pos, tok in _groups(idx, E):
        y = (act(O.index_select(0, pos)) @ w_out[e].t()) * gflat.index_select(0, pos)[:, None]
        out.index_add_(0, tok, y)
    return out + bias


def lm_loss(logits, tokens, labels=None):
    """Mean CE of positions 0..T-2 predicting targets 1..T-1 (-100 ignored)."""
    B, T, V = logits.shape
    tgt = tokens if labels is None else labels
    # shifted targets, -100 at the last position: no copy of the logits needed
    y = torch.cat((tgt[:, 1:], torch.full((B, 1), -100, dtype=torch.long)), 1).reshape(-1)
    n = int((y != -100).sum())
    if n == 0:
        return logits.sum() * 0.0 + 0.0   # keeps the graph; -0.0 + 0.0 == +0.0
    return F.cross_entropy(logits.reshape(B * T, V), y, ignore_index=-100,
                           reduction="sum") / n


def forward(cfg, params, tokens, labels=None, dtype=torch.float32, act=_same):
    """tokens LongTensor (B,T) -> dict(logits, loss, aux_loss, z_loss, loss_total,
    routing=[(moa_idx, moe_idx)] per layer (B*T,k), router_logits=[(z_moa, z_moe)]).
    act: what the inputs of every weight matrix (not the routers) become: bf16_inputs for a BF16
    checkpoint that jetmoe uses in place (jm_model_open: its activations rounded to BF16 for them)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens[None]
    B, T = tokens.shape
    V, L = cfg["vocab_size"], cfg["num_hidden_layers"]
    Hkv, D = cfg["num_key_value_heads"], cfg["kv_channels"]
    E, k, eps = cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["rms_norm_eps"]
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
        raise ValueError("token id out of range [0, %d)" % V)
    P = {n: (t if t.dtype == dtype else t.to(dtype)) for n, t in params.items()}
    emb = P["model.embed_tokens.weight"]
    x = emb.index_select(0, tokens.reshape(-1))                 # (N,H)
    cos, sin = rope_cos_sin(T, D, cfg["rope_theta"], dtype)
    aux = torch.zeros((), dtype=dtype)
    zls = torch.zeros((), dtype=dtype)
    routing, rlogits = [], []
    for i in range(L):
        p = "model.layers.%d." % i
        a = rmsnorm(x, P[p + "input_layernorm.weight"], eps)
        za, ia, ga = route(a, P[p + "self_attention.experts.router.layer.weight"], k)
        x = x + moa(a, B, T, ia, ga, P[p + "self_attention.kv_proj.weight"],
                    P[p + "self_attention.experts.input_linear.weight"],
                    P[p + "self_attention.experts.output_linear.weight"],
                    P[p + "self_attention.experts.bias"], Hkv, D, cos, sin, act)
        b = rmsnorm(x, P[p + "post_attention_layernorm.weight"], eps)
        zm, im, gm = route(b, P[p + "mlp.router.layer.weight"], k)
        x = x + moe(b, im, gm, P[p + "mlp.input_linear.weight"],
                    P[p + "mlp.output_linear.weight"], P[p + "mlp.bias"], act)
        for z, idx in ((za, ia), (zm, im)):
            sw, zl = router_losses(z, idx, E)
            aux = aux + sw
            zls = zls + zl
        routing.append((ia, im))
        rlogits.append((za, zm))
    h = rmsnorm(x, P["model.norm.weight"], eps)
    w = emb if cfg["tie_word_embeddings"] else P["lm_head.weight"]
    logits = (act(h) @ w.t()).reshape(B, T, V)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(B, T)
    loss = lm_loss(logits, tokens, labels)
    total = loss + cfg["aux_loss_coef"] * aux + cfg["z_loss_coef"] * zls
    return {"logits": logits, "loss": loss, "aux_loss": aux, "z_loss": zls,
            "loss_total": total, "routing": routing, "router_logits": rlogits}


# ----------------------------------------------------------------------------
# Self-test: naive re-statements of the spec, checked against the batched code
# ----------------------------------------------------------------------------


def _naive_topk(zrow, k):
    zs = [float(v) for v in zrow]
    sel = sorted(range(len(zs)), key=lambda e: (-zs[e], e))[:k]
    m = max(zs[e] for e in sel)
    ex = [math.exp(zs[e] - m) for e in sel]
    return sel, [v / sum(ex) for v in ex]


def _naive_rope(v, p, theta):
    D = v.shape[0]
    h = D // 2
    out = v.clone()
    for i in range(h):
        ang = p * theta ** (-2.0 * i / D)
        c, s = math.cos(ang), math.sin(ang)
        out[i] = v[i] * c - v[i + h] * s
        out[i + h] = v[i + h] * c + v[i] * s
    return out


def _naive_rms(v, w, eps):
    return v / math.sqrt(float((v * v).mean()) + eps) * w


def _naive_forward(cfg, params, tokens):
    """Per-token, per-head loops straight from the spec (float64)."""
    P = {n: t.double() for n, t in params.items()}
    B, T = tokens.shape
    L = cfg["num_hidden_layers"]
    Hkv, D, Fw = cfg["num_key_value_heads"], cfg["kv_channels"], cfg["intermediate_size"]
    E, k, eps, theta = (cfg["num_local_experts"], cfg["num_experts_per_tok"],
                        cfg["rms_norm_eps"], cfg["rope_theta"])
    aux, zls = 0.0, 0.0
    xs = [[P["model.embed_tokens.weight"][int(tokens[b, t])].clone() for t in range(T)]
          for b in range(B)]
    routing = []
    for i in range(L):
        pf = "model.layers.%d." % i
        Wr_a = P[pf + "self_attention.experts.router.layer.weight"]
        kvw = P[pf + "self_attention.kv_proj.weight"]
        Wqa = P[pf + "self_attention.experts.input_linear.weight"]
        Woa = P[pf + "self_attention.experts.output_linear.weight"]
        a_all = [[_naive_rms(xs[b][t], P[pf + "input_layernorm.weight"], eps) for t in range(T)]
                 for b in range(B)]
        stats = {"moa": [], "moe": []}
        sel_a = []
        new = []
        for b in range(B):
            keys = [[_naive_rope((kvw @ a_all[b][s])[h * D:(h + 1) * D], s, theta)
                     for h in range(Hkv)] for s in range(T)]
            vals = [[(kvw @ a_all[b][s])[Hkv * D + h * D: Hkv * D + (h + 1) * D]
                     for h in range(Hkv)] for s in range(T)]
            row = []
            for t in range(T):
                a = a_all[b][t]
                z = Wr_a @ a
                sel, g = _naive_topk(z, k)
                stats["moa"].append((z, sel))
                sel_a.append(sel)
                y = P[pf + "self_attention.experts.bias"].clone()
                for j, e in enumerate(sel):
                    q = Wqa[e] @ a
                    o = torch.zeros(Hkv * D, dtype=torch.float64)
                    for h in range(Hkv):
                        qh = _naive_rope(q[h * D:(h + 1) * D], t, theta)
                        sc = [float(qh @ keys[s][h]) / math.sqrt(D) for s in range(t + 1)]
                        m = max(sc)
                        w = [math.exp(v - m) for v in sc]
                        tot = sum(w)
                        for s in range(t + 1):
                            o[h * D:(h + 1) * D] += (w[s] / tot) * vals[s][h]
                    y = y + g[j] * (Woa[e] @ o)
                row.append(xs[b][t] + y)
            new.append(row)
        xs = new
        sel_m = []
        for b in range(B):
            for t in range(T):
                bb = _naive_rms(xs[b][t], P[pf + "post_attention_layernorm.weight"], eps)
                z = P[pf + "mlp.router.layer.weight"] @ bb
                sel, g = _naive_topk(z, k)
                stats["moe"].append((z, sel))
                sel_m.append(sel)
                y = P[pf + "mlp.bias"].clone()
                for j, e in enumerate(sel):
                    u = P[pf + "mlp.input_linear.weight"][e] @ bb
                    act = u[:Fw] / (1.0 + torch.exp(-u[:Fw])) * u[Fw:]
                    y = y + g[j] * (P[pf + "mlp.output_linear.weight"][e] @ act)
                xs[b][t] = xs[b][t] + y
        for r in ("moa", "moe"):
            Pe = [0.0] * E
            fe = [0] * E
            zsum = 0.0
            for z, sel in stats[r]:
                m = float(z.max())
                ex = [math.exp(float(v) - m) for v in z]
                s = sum(ex)
                for e in range(E):
                    Pe[e] += ex[e] / s
                for e in sel:
                    fe[e] += 1
                zsum += (m + math.log(s)) ** 2
            aux += E * sum((Pe[e] / sum(Pe)) * (fe[e] / sum(fe)) for e in range(E))
            zls += zsum / len(stats[r])
        routing.append((sel_a, sel_m))
    W = P["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else P["lm_head.weight"]
    logits = torch.zeros(B, T, cfg["vocab_size"], dtype=torch.float64)
    ce, n = 0.0, 0
    for b in range(B):
        for t in range(T):
            logits[b, t] = W @ _naive_rms(xs[b][t], P["model.norm.weight"], eps)
            if t + 1 < T:
                lg = logits[b, t]
                m = float(lg.max())
                lse = m + math.log(float(torch.exp(lg - m).sum()))
                ce += lse - float(lg[int(tokens[b, t + 1])])
                n += 1
    loss = ce / n if n else 0.0
    return {"logits": logits, "loss": loss, "aux_loss": aux, "z_loss": zls,
            "loss_total": loss + cfg["aux_loss_coef"] * aux + cfg["z_loss_coef"] * zls,
            "routing": routing}


TINY = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "kv_channels": 8, "intermediate_size": 24,
        "num_local_experts": 4, "num_experts_per_tok": 2}


def selftest(verbose=True):
    torch.manual_seed(0)
    results = []

    def check(name, ok, detail=""):
        results.append(bool(ok))
        if verbose:
            print("%s ref_selftest_%s%s" % ("PASS" if ok else "FAIL", name,
                                           (" (" + detail + ")") if detail else ""))
            sys.stdout.flush()

    def maxdiff(a, b):
        return float((torch.as_tensor(a, dtype=torch.float64) -
                      torch.as_tensor(b, dtype=torch.float64)).abs().max())

    # (a) k == E with equal router logits: MoE == dense average of all experts
    cfg = normalize_config(dict(TINY, num_experts_per_tok=4))
    prm = init_params(cfg, 1, perturb=True)
    N, H, E, Fw = 7, cfg["hidden_size"], 4, cfg["intermediate_size"]  # noqa: N806
    a = torch.randn(N, H, dtype=torch.float64)
    wr = torch.zeros(E, H, dtype=torch.float64)
    z, idx, g = route(a, wr, E)
    win = prm["model.layers.0.mlp.input_linear.weight"].double()
    wout = prm["model.layers.0.mlp.output_linear.weight"].double()
    bias = prm["model.layers.0.mlp.bias"].double()
    got = moe(a, idx, g, win, wout, bias)
    ref = torch.zeros(N, H, dtype=torch.float64)
    for n in range(N):
        acc = torch.zeros(H, dtype=torch.float64)
        for e in range(E):
            u = win[e] @ a[n]
            acc += wout[e] @ (F.silu(u[:Fw]) * u[Fw:])
        ref[n] = acc / E + bias
    d = maxdiff(got, ref)
    check("moe_dense_average", d < 1e-12 and bool((idx == torch.arange(E)).all()),
          "max diff %.2e" % d)
    sw, zl = router_losses(z, idx, E)
    check("aux_balanced_is_one", float(sw) == 1.0 and abs(float(zl) - math.log(E) ** 2) < 1e-12,
          "switch %r, z %r" % (float(sw), float(zl)))

    # tie rule: descending, ties broken by lower index
    zt = torch.tensor([[0.5, 2.0, 2.0, -1.0, 2.0, 0.5]])
    _, it, _ = route(zt.double(), torch.eye(6, dtype=torch.float64), 4)
    check("router_tie_order", it.tolist() == [[1, 2, 4, 0]], str(it.tolist()))

    # RoPE formula on a hand example and relative-position property
    v = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    cs, sn = rope_cos_sin(4, 4, 100.0, torch.float64)
    r = apply_rope(v, cs[3], sn[3])
    a0, a1 = 3.0, 3.0 / 10.0
    want = [1 * math.cos(a0) - 3 * math.sin(a0), 2 * math.cos(a1) - 4 * math.sin(a1),
            3 * math.cos(a0) + 1 * math.sin(a0), 4 * math.cos(a1) + 2 * math.sin(a1)]
    check("rope_formula", maxdiff(r, want) < 1e-14 and maxdiff(r, _naive_rope(v, 3, 100.0)) < 1e-14)
    q, kk = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    cs, sn = rope_cos_sin(20, 16, 10000.0, torch.float64)
    d1 = float(apply_rope(q, cs[7], sn[7]) @ apply_rope(kk, cs[3], sn[3]))
    d2 = float(apply_rope(q, cs[17], sn[17]) @ apply_rope(kk, cs[13], sn[13]))
    check("rope_relative", abs(d1 - d2) < 1e-12, "%.3e" % abs(d1 - d2))

    # (b) full naive per-token/per-head model vs batched forward, B=2, T=5
    def vs_naive(name, over, tol=1e-5, seed=3, T=5):
        c = normalize_config(dict(TINY, **over))
        pr = init_params(c, seed, perturb=True)
        tok = torch.randint(0, c["vocab_size"], (2, T), generator=torch.Generator().manual_seed(seed))
        nv = _naive_forward(c, pr, tok)
        ok, det = True, []
        for dt, tl in ((torch.float64, 1e-10), (torch.float32, tol)):
            o = forward(c, pr, tok, dtype=dt)
            routes_ok = all(o["routing"][i][0].tolist() == nv["routing"][i][0] and
                            o["routing"][i][1].tolist() == nv["routing"][i][1]
                            for i in range(c["num_hidden_layers"]))
            diffs = [maxdiff(o["logits"], nv["logits"])] + [
                abs(float(o[kx]) - nv[kx]) for kx in ("loss", "aux_loss", "z_loss", "loss_total")]
            ok = ok and routes_ok and max(diffs) < tl
            det.append("%s %.1e%s" % (str(dt)[6:], max(diffs), "" if routes_ok else " ROUTING"))
        check(name, ok, ", ".join(det))

    vs_naive("naive_tiny", {})
    vs_naive("naive_top1", {"num_experts_per_tok": 1})
    vs_naive("naive_topk_eq_E_untied", {"num_experts_per_tok": 4, "tie_word_embeddings": False})
    vs_naive("naive_odd_dims", {"hidden_size": 72, "kv_channels": 12, "num_key_value_heads": 3,
                                "intermediate_size": 20, "num_local_experts": 5,
                                "num_experts_per_tok": 3, "num_hidden_layers": 1})

    cfg = normalize_config(TINY)
    prm = init_params(cfg, 5, perturb=True)
    gen = torch.Generator().manual_seed(5)
    tok = torch.randint(0, 64, (2, 9), generator=gen)

    # (c) causality (float64: in fp32, expert-group sizes change GEMM rounding ~1e-6)
    o1 = forward(cfg, prm, tok)
    tok2 = tok.clone()
    tok2[:, 6] = (tok2[:, 6] + 1) % 64
    o1d = forward(cfg, prm, tok, dtype=torch.float64)
    o2 = forward(cfg, prm, tok2, dtype=torch.float64)
    before = maxdiff(o1d["logits"][:, :6], o2["logits"][:, :6])
    after = maxdiff(o1d["logits"][:, 6:], o2["logits"][:, 6:])
    check("causality", before < 1e-12 and after > 1e-3, "before %.1e, at/after %.1e" % (before, after))

    # batch rows are independent (logits, routing)
    ok = True
    for b in range(2):
        ob = forward(cfg, prm, tok[b:b + 1])
        ok = ok and maxdiff(ob["logits"][0], o1["logits"][b]) < 1e-5
        for i in range(2):
            for m in range(2):
                ok = ok and torch.equal(ob["routing"][i][m], o1["routing"][i][m][b * 9:(b + 1) * 9])
    check("batch_independent", ok)

    # routing is non-trivial with the perturbed init (gates away from uniform)
    used = set()
    for i in range(2):
        for m in range(2):
            used.update(o1["routing"][i][m].reshape(-1).tolist())
    check("perturbed_routing_nontrivial", len(used) == 4)

    # T == 1 -> loss 0; label mask
    o = forward(cfg, prm, tok[:, :1])
    check("loss_T1_zero", float(o["loss"]) == 0.0)
    lab = torch.full_like(tok, -100)
    lab[1, 4] = tok[1, 4]
    o = forward(cfg, prm, tok, labels=lab)
    want = float(F.cross_entropy(o1["logits"][1, 3][None], tok[1, 4][None]))
    check("labels_mask", abs(float(o["loss"]) - want) < 1e-6)

    # fp32 vs fp64 agree
    o64 = forward(cfg, prm, tok, dtype=torch.float64)
    check("fp32_vs_fp64", maxdiff(o1["logits"], o64["logits"]) < 1e-4,
          "%.1e" % maxdiff(o1["logits"], o64["logits"]))

    # autograd: gradcheck of loss_total in float64 w.r.t. a few tensors
    names = ["model.layers.1.mlp.bias", "model.layers.0.input_layernorm.weight",
             "model.layers.0.self_attention.experts.router.layer.weight",
             "model.layers.1.mlp.router.layer.weight"]
    p64 = {n: t.double() for n, t in prm.items()}
    ts = tuple(p64[n].clone().requires_grad_(True) for n in names)

    def fn(*xs):
        q = dict(p64)
        q.update(zip(names, xs))
        return forward(cfg, q, tok[:, :6], dtype=torch.float64)["loss_total"]
    try:
        ok = torch.autograd.gradcheck(fn, ts, eps=1e-6, atol=1e-6, rtol=1e-4)
    except Exception as ex:  # noqa: BLE001
        ok = False
        print("  gradcheck:", str(ex)[:300])
    check("gradcheck", ok)

    # BF16 / F16 rounding vs torch's converters, incl. specials
    vals = np.concatenate([np.random.RandomState(0).randn(10000).astype(np.float32) * 3,
                           np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -3.4e38,
                                     np.inf, -np.inf, 1e-40, 65504.0, 65520.0],
                                    dtype=np.float32)])
    tb = torch.from_numpy(vals).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    ok = np.array_equal(f32_to_bf16_bits(vals), tb)
    nan = f32_to_bf16_bits(np.array([np.nan], np.float32))
    ok = ok and np.isnan(bf16_bits_to_f32(nan)).all()
    th = torch.from_numpy(vals).to(torch.float16).float().numpy()
    ok = ok and np.array_equal(round_to_dtype(vals, "F16").view(np.uint32), th.view(np.uint32))
    check("bf16_f16_rounding", ok)

    # checkpoint round trips
    import tempfile
    with tempfile.TemporaryDirectory() as td:
        ok = True
        for dt, sh, tied in (("F32", 1, True), ("BF16", 3, False), ("F16", 2, True)):
            c = dict(cfg, tie_word_embeddings=tied)
            pr = round_params(init_params(c, 9, perturb=True), dt)
            dd = os.path.join(td, "%s%d" % (dt, sh))
            save_checkpoint(dd, c, pr, dtype=dt, shards=sh)
            c2, p2 = load_checkpoint(dd)
            c2.pop("torch_dtype", None)
            ok = ok and c2 == normalize_config(c) and set(p2) == set(pr)
            ok = ok and all(torch.equal(p2[n], pr[n]) for n in pr)
            if sh > 1:
                with open(os.path.join(dd, "model.safetensors.index.json")) as f:
                    ix = json.load(f)
                ok = ok and len(set(ix["weight_map"].values())) == sh
                ok = ok and ix["metadata"]["total_size"] == sum(
                    p.numel() * 2 for p in pr.values())
        # authors' aliases
        raw = dict(TINY)
        raw["ffn_hidden_size"] = raw.pop("intermediate_size")
        raw["moe_num_experts"] = raw.pop("num_local_experts")
        raw["moe_top_k"] = raw.pop("num_experts_per_tok")
        raw["head_dim"] = raw.pop("kv_channels")
        raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
        raw["num_attention_heads"] = 4
        c3 = normalize_config(raw)
        ok = ok and c3 == dict(normalize_config(TINY), rope_theta=5000.0)
        for bad in ({"num_experts_per_tok": 5}, {"num_attention_heads": 3}, {"hidden_size": 0}):
            try:
                normalize_config(dict(TINY, **bad))
                ok = False
            except ConfigError as ex:
                ok = ok and list(bad)[0] in str(ex)
        check("checkpoint_roundtrip_and_config", ok)

    nfail = results.count(False)
    if verbose:
        print("ref_selftest: %d passed, %d failed" % (len(results) - nfail, nfail))
    return nfail == 0


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def _parse_ints(s):
    return [int(v) for v in s.replace(" ", "").split(",") if v != ""]


def _cmd_make(args):
    over = json.loads(args.config) if args.config else {}
    cfg = normalize_config(over)
    params = init_params(cfg, args.seed, perturb=args.perturb)
    params = round_params(params, args.dtype)
    save_checkpoint(args.out, cfg, params, dtype=args.dtype, shards=args.shards)
    return 0


def _cmd_forward(args):
    cfg, params = load_checkpoint(args.dir)
    seqs = [_parse_ints(s) for s in args.tokens.split(";") if s.strip() != ""]
    if not seqs or any(len(s) != len(seqs[0]) or not s for s in seqs):
        raise SystemExit("forward: --tokens needs one or more equal-length, non-empty sequences")
    tokens = torch.tensor(seqs, dtype=torch.long)
    labels = None
    if args.labels:
        labels = torch.tensor([_parse_ints(s) for s in args.labels.split(";") if s.strip()],
                              dtype=torch.long)
        if labels.shape != tokens.shape:
            raise SystemExit("forward: --labels must have the shape of --tokens")
    dt = torch.float64 if args.float64 else torch.float32
    if args.backward:
        # gradients of loss_total w.r.t. every parameter, computed in dt
        leaf = {n: p.to(dt).detach().requires_grad_(True) for n, p in params.items()}
        o = forward(cfg, leaf, tokens, labels=labels, dtype=dt)
        o["loss_total"].backward()
        o = {kx: (v.detach() if torch.is_tensor(v) else v) for kx, v in o.items()}
    else:
        with torch.no_grad():
            o = forward(cfg, params, tokens, labels=labels, dtype=dt)
    B, T = tokens.shape
    out = {}
    if args.backward:
        for n, p in leaf.items():
            out["grad." + n] = (p.grad if p.grad is not None else torch.zeros_like(p)).float()
    lg = o["logits"].float()
    out["logits"] = lg[0] if B == 1 else lg
    for kx in ("loss", "aux_loss", "z_loss", "loss_total"):
        out[kx] = o[kx].float().reshape(1)
    for i, ((ia, im), (za, zm)) in enumerate(zip(o["routing"], o["router_logits"])):
        shp = (T, -1) if B == 1 else (B, T, -1)
        out["routing.layers.%d.moa" % i] = ia.reshape(shp).to(torch.int32)
        out["routing.layers.%d.moe" % i] = im.reshape(shp).to(torch.int32)
        out["router_logits.layers.%d.moa" % i] = za.float().reshape(shp)
        out["router_logits.layers.%d.moe" % i] = zm.float().reshape(shp)
    write_safetensors(args.dump, {kx: v.detach().numpy() for kx, v in out.items()})
    if args.verbose:
        print("loss %.6f aux %.6f z %.6f total %.6f" % tuple(
            float(o[kx]) for kx in ("loss", "aux_loss", "z_loss", "loss_total")))
    return 0


def schedule_lr(kind, step, peak, warmup, total, decay, min_ratio):
    """The recipe's schedule, restated from the README: linear warmup to the
    peak over `warmup` updates, then constant / WSD (exponential decay to
    peak*min_ratio over the last `decay` updates) / cosine to peak*min_ratio."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    if kind == "cosine":
        span = total - warmup
        t = min(1.0, (step - warmup) / span) if span > 0 else 1.0
        lo = peak * min_ratio
        return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * t))
    start = total - decay
    if decay <= 0 or step < start:
        return peak
    t = min(1.0, (step - start + 1) / decay)
    return peak * min_ratio ** t


def _cmd_train(args):
    """N AdamW steps from a checkpoint on given batches (torch.optim.AdamW,
    no weight decay on 1-D parameters, clip_grad_norm_), dumping per-step
    losses and the final weights."""
    cfg, params = load_checkpoint(args.dir)
    batches = torch.from_numpy(read_safetensors(args.batches)["tokens"].astype(np.int64))
    steps, accum = batches.shape[0], batches.shape[1]
    leaf = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    decay = [p for n, p in leaf.items() if p.dim() >= 2]
    no_decay = [p for n, p in leaf.items() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    rows = []
    for i in range(steps):
        lr = schedule_lr(args.schedule, i, args.lr, args.warmup, steps, args.decay, args.min_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        acc = [0.0, 0.0, 0.0]
        for j in range(accum):
            o = forward(cfg, leaf, batches[i, j])
            (o["loss_total"] / accum).backward()
            acc = [a + float(o[k]) / accum for a, k in zip(acc, ("loss", "aux_loss", "z_loss"))]
        gn = torch.nn.utils.clip_grad_norm_(list(leaf.values()), args.clip if args.clip > 0 else float("inf"))
        opt.step()
        rows.append(acc + [float(gn), lr])
    out = {"steps": np.array(rows, dtype=np.float32)}
    for n, p in leaf.items():
        out[n] = p.detach().float().numpy()
    write_safetensors(args.dump, out)
    return 0


def _cmd_generate(args):
    """Greedy decoding without a cache: rerun the whole sequence, take the
    argmax (lowest id on ties) of the last position, stop at EOS."""
    cfg, params = load_checkpoint(args.dir)
    seq = _parse_ints(args.tokens)
    out = []
    dt = torch.float64 if args.float64 else torch.float32
    with torch.no_grad():
        for _ in range(args.max_new):
            logits = forward(cfg, params, torch.tensor([seq], dtype=torch.long), dtype=dt)["logits"][0, -1]
            best = int(torch.nonzero(logits == logits.max())[0])
            seq.append(best)
            out.append(best)
            if best == cfg["eos_token_id"]:
                break
    print(" ".join(str(t) for t in out))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="jetmoe_ref.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a random checkpoint")
    m.add_argument("--out", required=True)
    m.add_argument("--config", default="", help="JSON object of HF-named overrides")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", choices=("F32", "BF16", "F16"), default="F32")
    m.add_argument("--shards", type=int, default=1)
    m.add_argument("--perturb", dest="perturb", action="store_true", default=True,
                   help="test init that exercises every term (default)")
    m.add_argument("--no-perturb", dest="perturb", action="store_false",
                   help="the spec's training init")
    f = sub.add_parser("forward", help="run one forward pass and dump tensors")
    f.add_argument("dir")
    f.add_argument("--tokens", required=True,
                   help="comma-separated ids; several equal-length sequences separated by ';'")
    f.add_argument("--labels", default="", help="like --tokens; -100 = ignored (write --labels=-100,...)")
    f.add_argument("--dump", required=True)
    f.add_argument("--float64", action="store_true")
    f.add_argument("--backward", action="store_true",
                   help="also dump grad.<name> of loss_total for every parameter")
    f.add_argument("-v", "--verbose", action="store_true")
    tr = sub.add_parser("train", help="N AdamW steps on given batches; dump losses and weights")
    tr.add_argument("dir")
    tr.add_argument("--batches", required=True, help="safetensors with I32 tokens (steps, accum, B, T)")
    tr.add_argument("--dump", required=True)
    for name, default in (("lr", 1e-3), ("warmup", 0), ("decay", 0), ("min_ratio", 0.1), ("beta1", 0.9),
                          ("beta2", 0.95), ("eps", 1e-8), ("wd", 0.1), ("clip", 1.0)):
        tr.add_argument("--" + name, type=type(default), default=default)
    tr.add_argument("--schedule", choices=("wsd", "cosine", "constant"), default="wsd")
    gn = sub.add_parser("generate", help="greedy decoding without a KV cache; prints the new ids")
    gn.add_argument("dir")
    gn.add_argument("--tokens", required=True)
    gn.add_argument("--max-new", type=int, default=64)
    gn.add_argument("--float64", action="store_true")
    sub.add_parser("selftest", help="internal consistency checks")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "make":
            return _cmd_make(args)
        if args.cmd == "forward":
            return _cmd_forward(args)
        if args.cmd == "train":
            return _cmd_train(args)
        if args.cmd == "generate":
            return _cmd_generate(args)
        return 0 if selftest() else 1
    except (ConfigError, ValueError, FileNotFoundError) as ex:
        print("jetmoe_ref: %s" % ex, file=sys.stderr)
        return 2



def run_batch(jobs_path, default_main):
    """Several commands in one process, which pays torch's import once: each
    line of jobs_path {"id", "argv", "tool"} runs default_main(argv), or this
    module's main when tool is "jetmoe_ref"; prints one JSON line per job, in
    order: {"id", "rc", "stdout", "stderr"}. Returns 1 if any job failed."""
    import contextlib
    import io
    with open(jobs_path, encoding="utf-8") as f:
        jobs = [json.loads(line) for line in f if line.strip()]
    worst = 0
    for job in jobs:
        fn = main if job.get("tool") == "jetmoe_ref" else default_main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = fn(list(job["argv"]))
            except SystemExit as ex:  # argparse
                rc = ex.code if isinstance(ex.code, int) else 2
            except Exception as ex:  # noqa: BLE001  (one job's crash is its own result)
                rc = 3
                print("%s: %s" % (type(ex).__name__, ex), file=sys.stderr)
        worst = max(worst, rc or 0)
        print(json.dumps({"id": job.get("id"), "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}))
        sys.stdout.flush()
    return 1 if worst else 0

if __name__ == "__main__":
    sys.exit(main())
