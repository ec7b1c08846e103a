"""Golden graphs: the example GPT and Llama rewritten for world_size 2 and 4, rank 1.

Each golden is ``Report.golden()``: the plan, every collective of the forward and backward
graphs (kind, bytes, module, source line) and the rewritten graph code. A collective added,
removed or moved, or a parameter laid out differently, changes the text. Regenerate after
an intended change with ``EXPECTTEST_ACCEPT=1 pytest tests/test_golden.py``.
"""
import expecttest
import pytest

import gpt
import llama
import tpcompile


def _gpt(ws, **plan):
    model, args = gpt.make_model(n_layer=1)
    return tpcompile.explain(model, *args, world_size=ws, rank=1, plan=plan or None)


def _llama(ws):
    model, args = llama.make_model(n_layers=1, device="meta")
    return tpcompile.explain(model, *args, world_size=ws, rank=1)


class TestGolden(expecttest.TestCase):
    def test_gpt_tp2(self):
        self.assertExpectedInline(_gpt(2).golden(), """\
# plan
wte.weight              vocab     dim 0           [256, 64] -> [128, 64]
wpe.weight              replicate                 [32, 64]
h.0.ln_1.weight         replicate                 [64]
h.0.ln_1.bias           replicate                 [64]
h.0.attn.q_proj.weight  colwise   dim 0           [64, 64] -> [32, 64]
h.0.attn.q_proj.bias    colwise   dim 0           [64] -> [32]
h.0.attn.k_proj.weight  colwise   dim 0           [64, 64] -> [32, 64]
h.0.attn.k_proj.bias    colwise   dim 0           [64] -> [32]
h.0.attn.v_proj.weight  colwise   dim 0           [64, 64] -> [32, 64]
h.0.attn.v_proj.bias    colwise   dim 0           [64] -> [32]
h.0.attn.o_proj.weight  rowwise   dim 1           [64, 64] -> [64, 32]
h.0.attn.o_proj.bias    replicate                 [64]
h.0.ln_2.weight         replicate                 [64]
h.0.ln_2.bias           replicate                 [64]
h.0.mlp.fc.weight       colwise   dim 0           [256, 64] -> [128, 64]
h.0.mlp.fc.bias         colwise   dim 0           [256] -> [128]
h.0.mlp.proj.weight     rowwise   dim 1           [64, 256] -> [64, 128]
h.0.mlp.proj.bias       replicate                 [64]
ln_f.weight             replicate                 [64]
ln_f.bias               replicate                 [64]
# collectives
forward  all_reduce       32.0 KiB  wte              examples/gpt.py:125 `tok_emb = self.wte(idx)  # (b, t, n_embd)`
forward  all_reduce       32.0 KiB  h.0.attn.o_proj  examples/gpt.py:54 `return self.resid_dropout(self.o_proj(y))`
forward  all_reduce       32.0 KiB  h.0.mlp.proj     examples/gpt.py:68 `x = self.proj(x)`
forward  all_gather        3.0 KiB  (model)          examples/gpt.py:135 `return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)`
backward all_reduce       32.0 KiB  lm_head          examples/gpt.py:131 `logits = self.lm_head(x)  # (b, t, vocab_size)`
backward all_reduce       32.0 KiB  h.0.mlp.fc       examples/gpt.py:66 `x = self.fc(x)`
backward all_reduce       32.0 KiB  h.0.attn.q_proj  examples/gpt.py:47 `q = self.q_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)`
# graph
def forward(self, idx, wte_weight, wpe_weight, h_0_ln_1_weight, h_0_ln_1_bias, h_0_attn_q_proj_weight, h_0_attn_q_proj_bias, h_0_attn_k_proj_weight, h_0_attn_k_proj_bias, h_0_attn_v_proj_weight, h_0_attn_v_proj_bias, h_0_attn_o_proj_weight, h_0_attn_o_proj_bias, h_0_ln_2_weight, h_0_ln_2_bias, h_0_mlp_fc_weight, h_0_mlp_fc_bias, h_0_mlp_proj_weight, h_0_mlp_proj_bias, ln_f_weight, ln_f_bias, targets):
    pos = torch.arange(0, 32, dtype = torch.int64, device = device(type='cpu'))
    tok_emb = tpcompile_runtime_vocab_parallel_vocab_parallel_embedding(idx, wte_weight, None, '0')
    pos_emb = torch.nn.functional.embedding(pos, wpe_weight, None, None, 2.0, False, False)
    add = tok_emb + pos_emb
    x = torch.nn.functional.dropout(add, 0.0, True, False)
    layer_norm = torch.nn.functional.layer_norm(x, (64,), h_0_ln_1_weight, h_0_ln_1_bias, 1e-05)
    copy_to_tp = tpcompile_runtime_mappings_copy_to_tp(layer_norm, '0')
    linear = torch._C._nn.linear(copy_to_tp, h_0_attn_q_proj_weight, h_0_attn_q_proj_bias)
    view = linear.view(4, 32, 2, 16)
    q = view.transpose(1, 2)
    linear_1 = torch._C._nn.linear(copy_to_tp, h_0_attn_k_proj_weight, h_0_attn_k_proj_bias)
    view_1 = linear_1.view(4, 32, 2, 16)
    k = view_1.transpose(1, 2)
    linear_2 = torch._C._nn.linear(copy_to_tp, h_0_attn_v_proj_weight, h_0_attn_v_proj_bias)
    view_2 = linear_2.view(4, 32, 2, 16)
    v = view_2.transpose(1, 2)
    y = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask = None, dropout_p = 0.0, is_causal = True)
    transpose_3 = y.transpose(1, 2)
    contiguous = transpose_3.contiguous()
    y_1 = contiguous.view(4, 32, 32)
    linear_3 = torch._C._nn.linear(y_1, h_0_attn_o_proj_weight, None)
    reduce_from_tp = tpcompile_runtime_mappings_reduce_from_tp(linear_3, '0')
    add_3 = reduce_from_tp + h_0_attn_o_proj_bias
    dropout_1 = torch.nn.functional.dropout(add_3, 0.0, True, False)
    x_1 = x + dropout_1
    layer_norm_1 = torch.nn.functional.layer_norm(x_1, (64,), h_0_ln_2_weight, h_0_ln_2_bias, 1e-05)
    copy_to_tp_1 = tpcompile_runtime_mappings_copy_to_tp(layer_norm_1, '0')
    x_2 = torch._C._nn.linear(copy_to_tp_1, h_0_mlp_fc_weight, h_0_mlp_fc_bias)
    x_3 = torch._C._nn.gelu(x_2, approximate = 'none')
    x_4 = torch._C._nn.linear(x_3, h_0_mlp_proj_weight, None)
    reduce_from_tp_1 = tpcompile_runtime_mappings_reduce_from_tp(x_4, '0')
    add_4 = reduce_from_tp_1 + h_0_mlp_proj_bias
    dropout_2 = torch.nn.functional.dropout(add_4, 0.0, True, False)
    x_5 = x_1 + dropout_2
    x_6 = torch.nn.functional.layer_norm(x_5, (64,), ln_f_weight, ln_f_bias, 1e-05)
    copy_to_tp_2 = tpcompile_runtime_mappings_copy_to_tp(x_6, '0')
    logits = torch._C._nn.linear(copy_to_tp_2, wte_weight, None)
    view_4 = logits.view(-1, 128)
    view_5 = targets.view(-1)
    cross_entropy = tpcompile_runtime_vocab_parallel_vocab_parallel_cross_entropy(view_4, view_5, None, 256, '0', ignore_index = -1, reduction = 'mean', label_smoothing = 0.0)
    return (cross_entropy,)
""")

    def test_gpt_tp4(self):
        self.assertExpectedInline(_gpt(4).golden(), """\
# plan
wte.weight              vocab     dim 0           [256, 64] -> [64, 64]
wpe.weight              replicate                 [32, 64]
h.0.ln_1.weight         replicate                 [64]
h.0.ln_1.bias           replicate                 [64]
h.0.attn.q_proj.weight  colwise   dim 0           [64, 64] -> [16, 64]
h.0.attn.q_proj.bias    colwise   dim 0           [64] -> [16]
h.0.attn.k_proj.weight  colwise   dim 0           [64, 64] -> [16, 64]
h.0.attn.k_proj.bias    colwise   dim 0           [64] -> [16]
h.0.attn.v_proj.weight  colwise   dim 0           [64, 64] -> [16, 64]
h.0.attn.v_proj.bias    colwise   dim 0           [64] -> [16]
h.0.attn.o_proj.weight  rowwise   dim 1           [64, 64] -> [64, 16]
h.0.attn.o_proj.bias    replicate                 [64]
h.0.ln_2.weight         replicate                 [64]
h.0.ln_2.bias           replicate                 [64]
h.0.mlp.fc.weight       colwise   dim 0           [256, 64] -> [64, 64]
h.0.mlp.fc.bias         colwise   dim 0           [256] -> [64]
h.0.mlp.proj.weight     rowwise   dim 1           [64, 256] -> [64, 64]
h.0.mlp.proj.bias       replicate                 [64]
ln_f.weight             replicate                 [64]
ln_f.bias               replicate                 [64]
# collectives
forward  all_reduce       32.0 KiB  wte              examples/gpt.py:125 `tok_emb = self.wte(idx)  # (b, t, n_embd)`
forward  all_reduce       32.0 KiB  h.0.attn.o_proj  examples/gpt.py:54 `return self.resid_dropout(self.o_proj(y))`
forward  all_reduce       32.0 KiB  h.0.mlp.proj     examples/gpt.py:68 `x = self.proj(x)`
forward  all_gather        6.0 KiB  (model)          examples/gpt.py:135 `return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)`
backward all_reduce       32.0 KiB  lm_head          examples/gpt.py:131 `logits = self.lm_head(x)  # (b, t, vocab_size)`
backward all_reduce       32.0 KiB  h.0.mlp.fc       examples/gpt.py:66 `x = self.fc(x)`
backward all_reduce       32.0 KiB  h.0.attn.q_proj  examples/gpt.py:47 `q = self.q_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)`
# graph
def forward(self, idx, wte_weight, wpe_weight, h_0_ln_1_weight, h_0_ln_1_bias, h_0_attn_q_proj_weight, h_0_attn_q_proj_bias, h_0_attn_k_proj_weight, h_0_attn_k_proj_bias, h_0_attn_v_proj_weight, h_0_attn_v_proj_bias, h_0_attn_o_proj_weight, h_0_attn_o_proj_bias, h_0_ln_2_weight, h_0_ln_2_bias, h_0_mlp_fc_weight, h_0_mlp_fc_bias, h_0_mlp_proj_weight, h_0_mlp_proj_bias, ln_f_weight, ln_f_bias, targets):
    pos = torch.arange(0, 32, dtype = torch.int64, device = device(type='cpu'))
    tok_emb = tpcompile_runtime_vocab_parallel_vocab_parallel_embedding(idx, wte_weight, None, '0')
    pos_emb = torch.nn.functional.embedding(pos, wpe_weight, None, None, 2.0, False, False)
    add = tok_emb + pos_emb
    x = torch.nn.functional.dropout(add, 0.0, True, False)
    layer_norm = torch.nn.functional.layer_norm(x, (64,), h_0_ln_1_weight, h_0_ln_1_bias, 1e-05)
    copy_to_tp = tpcompile_runtime_mappings_copy_to_tp(layer_norm, '0')
    linear = torch._C._nn.linear(copy_to_tp, h_0_attn_q_proj_weight, h_0_attn_q_proj_bias)
    view = linear.view(4, 32, 1, 16)
    q = view.transpose(1, 2)
    linear_1 = torch._C._nn.linear(copy_to_tp, h_0_attn_k_proj_weight, h_0_attn_k_proj_bias)
    view_1 = linear_1.view(4, 32, 1, 16)
    k = view_1.transpose(1, 2)
    linear_2 = torch._C._nn.linear(copy_to_tp, h_0_attn_v_proj_weight, h_0_attn_v_proj_bias)
    view_2 = linear_2.view(4, 32, 1, 16)
    v = view_2.transpose(1, 2)
    y = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask = None, dropout_p = 0.0, is_causal = True)
    transpose_3 = y.transpose(1, 2)
    contiguous = transpose_3.contiguous()
    y_1 = contiguous.view(4, 32, 16)
    linear_3 = torch._C._nn.linear(y_1, h_0_attn_o_proj_weight, None)
    reduce_from_tp = tpcompile_runtime_mappings_reduce_from_tp(linear_3, '0')
    add_3 = reduce_from_tp + h_0_attn_o_proj_bias
    dropout_1 = torch.nn.functional.dropout(add_3, 0.0, True, False)
    x_1 = x + dropout_1
    layer_norm_1 = torch.nn.functional.layer_norm(x_1, (64,), h_0_ln_2_weight, h_0_ln_2_bias, 1e-05)
    copy_to_tp_1 = tpcompile_runtime_mappings_copy_to_tp(layer_norm_1, '0')
    x_2 = torch._C._nn.linear(copy_to_tp_1, h_0_mlp_fc_weight, h_0_mlp_fc_bias)
    x_3 = torch._C._nn.gelu(x_2, approximate = 'none')
    x_4 = torch._C._nn.linear(x_3, h_0_mlp_proj_weight, None)
    reduce_from_tp_1 = tpcompile_runtime_mappings_reduce_from_tp(x_4, '0')
    add_4 = reduce_from_tp_1 + h_0_mlp_proj_bias
    dropout_2 = torch.nn.functional.dropout(add_4, 0.0, True, False)
    x_5 = x_1 + dropout_2
    x_6 = torch.nn.functional.layer_norm(x_5, (64,), ln_f_weight, ln_f_bias, 1e-05)
    copy_to_tp_2 = tpcompile_runtime_mappings_copy_to_tp(x_6, '0')
    logits = torch._C._nn.linear(copy_to_tp_2, wte_weight, None)
    view_4 = logits.view(-1, 64)
    view_5 = targets.view(-1)
    cross_entropy = tpcompile_runtime_vocab_parallel_vocab_parallel_cross_entropy(view_4, view_5, None, 256, '0', ignore_index = -1, reduction = 'mean', label_smoothing = 0.0)
    return (cross_entropy,)
""")

    def test_llama_tp2(self):
        self.assertExpectedInline(_llama(2).golden(), """\
# plan
tok_embeddings.weight              vocab     dim 0           [256, 64] -> [128, 64]
layers.0.attention_norm.weight     replicate                 [64]
layers.0.attention.q_proj.weight   colwise   dim 0           [64, 64] -> [32, 64]
layers.0.attention.k_proj.weight   colwise   dim 0           [64, 64] -> [32, 64]
layers.0.attention.v_proj.weight   colwise   dim 0           [64, 64] -> [32, 64]
layers.0.attention.o_proj.weight   rowwise   dim 1           [64, 64] -> [64, 32]
layers.0.ffn_norm.weight           replicate                 [64]
layers.0.feed_forward.gate.weight  colwise   dim 0           [128, 64] -> [64, 64]
layers.0.feed_forward.up.weight    colwise   dim 0           [128, 64] -> [64, 64]
layers.0.feed_forward.down.weight  rowwise   dim 1           [64, 128] -> [64, 64]
norm.weight                        replicate                 [64]
output.weight                      colwise   dim 0           [256, 64] -> [128, 64]
# collectives
forward  all_reduce       32.0 KiB  tok_embeddings              examples/llama.py:141 `h = self.tok_embeddings(tokens)`
forward  all_reduce       32.0 KiB  layers.0.attention.o_proj   examples/llama.py:93 `return self.o_proj(out)`
forward  all_reduce       32.0 KiB  layers.0.feed_forward.down  examples/llama.py:104 `return self.down(F.silu(self.gate(x)) * self.up(x))`
forward  all_gather        3.0 KiB  (model)                     examples/llama.py:152 `return loss_fn(logits.view(-1, self.config.vocab_size), labels.view(-1))`
backward all_reduce       32.0 KiB  output                      examples/llama.py:147 `logits = self.output(h).float()`
backward all_reduce       32.0 KiB  layers.0.feed_forward.gate  examples/llama.py:104 `return self.down(F.silu(self.gate(x)) * self.up(x))`
backward all_reduce       32.0 KiB  layers.0.attention.q_proj   examples/llama.py:82 `q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)`
# graph
def forward(self, tokens, tok_embeddings_weight, rope_cos, rope_sin, layers_0_attention_norm_weight, layers_0_attention_q_proj_weight, layers_0_attention_k_proj_weight, layers_0_attention_v_proj_weight, layers_0_attention_o_proj_weight, layers_0_ffn_norm_weight, layers_0_feed_forward_gate_weight, layers_0_feed_forward_up_weight, layers_0_feed_forward_down_weight, norm_weight, output_weight, labels):
    h = tpcompile_runtime_vocab_parallel_vocab_parallel_embedding(tokens, tok_embeddings_weight, None, '0')
    cos = rope_cos[slice(None, 32, None)]
    sin = rope_sin[slice(None, 32, None)]
    float_1 = h.float()
    pow_1 = float_1.pow(2)
    mean = pow_1.mean(-1, keepdim = True)
    add = mean + 1e-05
    rsqrt = torch.rsqrt(add)
    mul = float_1 * rsqrt
    output = mul.type_as(h)
    mul_1 = output * layers_0_attention_norm_weight
    copy_to_tp = tpcompile_runtime_mappings_copy_to_tp(mul_1, '0')
    linear = torch._C._nn.linear(copy_to_tp, layers_0_attention_q_proj_weight, None)
    view = linear.view(4, 32, 2, 16)
    q = view.transpose(1, 2)
    linear_1 = torch._C._nn.linear(copy_to_tp, layers_0_attention_k_proj_weight, None)
    view_1 = linear_1.view(4, 32, 2, 16)
    k = view_1.transpose(1, 2)
    linear_2 = torch._C._nn.linear(copy_to_tp, layers_0_attention_v_proj_weight, None)
    view_2 = linear_2.view(4, 32, 2, 16)
    v = view_2.transpose(1, 2)
    mul_2 = q * cos
    x1 = q[(Ellipsis, slice(None, 8, None))]
    x2 = q[(Ellipsis, slice(8, None, None))]
    neg = -x2
    cat = torch.cat((neg, x1), dim = -1)
    mul_3 = cat * sin
    q_out = mul_2 + mul_3
    mul_4 = k * cos
    x1_1 = k[(Ellipsis, slice(None, 8, None))]
    x2_1 = k[(Ellipsis, slice(8, None, None))]
    neg_1 = -x2_1
    cat_1 = torch.cat((neg_1, x1_1), dim = -1)
    mul_5 = cat_1 * sin
    k_out = mul_4 + mul_5
    q_1 = q_out.type_as(q)
    k_1 = k_out.type_as(k)
    transpose_3 = k_1.transpose(-2, -1)
    matmul = q_1 @ transpose_3
    scores = matmul / 4.0
    ones = torch.ones(32, 32, dtype = torch.bool, device = device(type='cpu'))
    mask = torch.triu(ones, diagonal = 1)
    scores_1 = scores.masked_fill(mask, -inf)
    float_2 = scores_1.float()
    softmax = torch.nn.functional.softmax(float_2, dim = -1)
    scores_2 = softmax.type_as(q_1)
    out = scores_2 @ v
    transpose_4 = out.transpose(1, 2)
    contiguous = transpose_4.contiguous()
    out_1 = contiguous.view(4, 32, -1)
    linear_3 = torch._C._nn.linear(out_1, layers_0_attention_o_proj_weight, None)
    reduce_from_tp = tpcompile_runtime_mappings_reduce_from_tp(linear_3, '0')
    h_1 = h + reduce_from_tp
    float_3 = h_1.float()
    pow_2 = float_3.pow(2)
    mean_1 = pow_2.mean(-1, keepdim = True)
    add_4 = mean_1 + 1e-05
    rsqrt_1 = torch.rsqrt(add_4)
    mul_6 = float_3 * rsqrt_1
    output_1 = mul_6.type_as(h_1)
    mul_7 = output_1 * layers_0_ffn_norm_weight
    copy_to_tp_1 = tpcompile_runtime_mappings_copy_to_tp(mul_7, '0')
    linear_4 = torch._C._nn.linear(copy_to_tp_1, layers_0_feed_forward_gate_weight, None)
    silu = torch.nn.functional.silu(linear_4)
    linear_5 = torch._C._nn.linear(copy_to_tp_1, layers_0_feed_forward_up_weight, None)
    mul_8 = silu * linear_5
    linear_6 = torch._C._nn.linear(mul_8, layers_0_feed_forward_down_weight, None)
    reduce_from_tp_1 = tpcompile_runtime_mappings_reduce_from_tp(linear_6, '0')
    h_2 = h_1 + reduce_from_tp_1
    float_4 = h_2.float()
    pow_3 = float_4.pow(2)
    mean_2 = pow_3.mean(-1, keepdim = True)
    add_6 = mean_2 + 1e-05
    rsqrt_2 = torch.rsqrt(add_6)
    mul_9 = float_4 * rsqrt_2
    output_2 = mul_9.type_as(h_2)
    h_3 = output_2 * norm_weight
    copy_to_tp_2 = tpcompile_runtime_mappings_copy_to_tp(h_3, '0')
    linear_7 = torch._C._nn.linear(copy_to_tp_2, output_weight, None)
    logits = linear_7.float()
    view_4 = logits.view(-1, 128)
    view_5 = labels.view(-1)
    cross_entropy = tpcompile_runtime_vocab_parallel_vocab_parallel_cross_entropy(view_4, view_5, None, 256, '0', ignore_index = -100, reduction = 'mean', label_smoothing = 0.0)
    return (cross_entropy,)
""")

    def test_llama_tp4(self):
        self.assertExpectedInline(_llama(4).golden(), """\
# plan
tok_embeddings.weight              vocab     dim 0           [256, 64] -> [64, 64]
layers.0.attention_norm.weight     replicate                 [64]
layers.0.attention.q_proj.weight   colwise   dim 0           [64, 64] -> [16, 64]
layers.0.attention.k_proj.weight   colwise   dim 0           [64, 64] -> [16, 64]
layers.0.attention.v_proj.weight   colwise   dim 0           [64, 64] -> [16, 64]
layers.0.attention.o_proj.weight   rowwise   dim 1           [64, 64] -> [64, 16]
layers.0.ffn_norm.weight           replicate                 [64]
layers.0.feed_forward.gate.weight  colwise   dim 0           [128, 64] -> [32, 64]
layers.0.feed_forward.up.weight    colwise   dim 0           [128, 64] -> [32, 64]
layers.0.feed_forward.down.weight  rowwise   dim 1           [64, 128] -> [64, 32]
norm.weight                        replicate                 [64]
output.weight                      colwise   dim 0           [256, 64] -> [64, 64]
# collectives
forward  all_reduce       32.0 KiB  tok_embeddings              examples/llama.py:141 `h = self.tok_embeddings(tokens)`
forward  all_reduce       32.0 KiB  layers.0.attention.o_proj   examples/llama.py:93 `return self.o_proj(out)`
forward  all_reduce       32.0 KiB  layers.0.feed_forward.down  examples/llama.py:104 `return self.down(F.silu(self.gate(x)) * self.up(x))`
forward  all_gather        6.0 KiB  (model)                     examples/llama.py:152 `return loss_fn(logits.view(-1, self.config.vocab_size), labels.view(-1))`
backward all_reduce       32.0 KiB  output                      examples/llama.py:147 `logits = self.output(h).float()`
backward all_reduce       32.0 KiB  layers.0.feed_forward.gate  examples/llama.py:104 `return self.down(F.silu(self.gate(x)) * self.up(x))`
backward all_reduce       32.0 KiB  layers.0.attention.q_proj   examples/llama.py:82 `q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)`
# graph
def forward(self, tokens, tok_embeddings_weight, rope_cos, rope_sin, layers_0_attention_norm_weight, layers_0_attention_q_proj_weight, layers_0_attention_k_proj_weight, layers_0_attention_v_proj_weight, layers_0_attention_o_proj_weight, layers_0_ffn_norm_weight, layers_0_feed_forward_gate_weight, layers_0_feed_forward_up_weight, layers_0_feed_forward_down_weight, norm_weight, output_weight, labels):
    h = tpcompile_runtime_vocab_parallel_vocab_parallel_embedding(tokens, tok_embeddings_weight, None, '0')
    cos = rope_cos[slice(None, 32, None)]
    sin = rope_sin[slice(None, 32, None)]
    float_1 = h.float()
    pow_1 = float_1.pow(2)
    mean = pow_1.mean(-1, keepdim = True)
    add = mean + 1e-05
    rsqrt = torch.rsqrt(add)
    mul = float_1 * rsqrt
    output = mul.type_as(h)
    mul_1 = output * layers_0_attention_norm_weight
    copy_to_tp = tpcompile_runtime_mappings_copy_to_tp(mul_1, '0')
    linear = torch._C._nn.linear(copy_to_tp, layers_0_attention_q_proj_weight, None)
    view = linear.view(4, 32, 1, 16)
    q = view.transpose(1, 2)
    linear_1 = torch._C._nn.linear(copy_to_tp, layers_0_attention_k_proj_weight, None)
    view_1 = linear_1.view(4, 32, 1, 16)
    k = view_1.transpose(1, 2)
    linear_2 = torch._C._nn.linear(copy_to_tp, layers_0_attention_v_proj_weight, None)
    view_2 = linear_2.view(4, 32, 1, 16)
    v = view_2.transpose(1, 2)
    mul_2 = q * cos
    x1 = q[(Ellipsis, slice(None, 8, None))]
    x2 = q[(Ellipsis, slice(8, None, None))]
    neg = -x2
    cat = torch.cat((neg, x1), dim = -1)
    mul_3 = cat * sin
    q_out = mul_2 + mul_3
    mul_4 = k * cos
    x1_1 = k[(Ellipsis, slice(None, 8, None))]
    x2_1 = k[(Ellipsis, slice(8, None, None))]
    neg_1 = -x2_1
    cat_1 = torch.cat((neg_1, x1_1), dim = -1)
    mul_5 = cat_1 * sin
    k_out = mul_4 + mul_5
    q_1 = q_out.type_as(q)
    k_1 = k_out.type_as(k)
    transpose_3 = k_1.transpose(-2, -1)
    matmul = q_1 @ transpose_3
    scores = matmul / 4.0
    ones = torch.ones(32, 32, dtype = torch.bool, device = device(type='cpu'))
    mask = torch.triu(ones, diagonal = 1)
    scores_1 = scores.masked_fill(mask, -inf)
    float_2 = scores_1.float()
    softmax = torch.nn.functional.softmax(float_2, dim = -1)
    scores_2 = softmax.type_as(q_1)
    out = scores_2 @ v
    transpose_4 = out.transpose(1, 2)
    contiguous = transpose_4.contiguous()
    out_1 = contiguous.view(4, 32, -1)
    linear_3 = torch._C._nn.linear(out_1, layers_0_attention_o_proj_weight, None)
    reduce_from_tp = tpcompile_runtime_mappings_reduce_from_tp(linear_3, '0')
    h_1 = h + reduce_from_tp
    float_3 = h_1.float()
    pow_2 = float_3.pow(2)
    mean_1 = pow_2.mean(-1, keepdim = True)
    add_4 = mean_1 + 1e-05
    rsqrt_1 = torch.rsqrt(add_4)
    mul_6 = float_3 * rsqrt_1
    output_1 = mul_6.type_as(h_1)
    mul_7 = output_1 * layers_0_ffn_norm_weight
    copy_to_tp_1 = tpcompile_runtime_mappings_copy_to_tp(mul_7, '0')
    linear_4 = torch._C._nn.linear(copy_to_tp_1, layers_0_feed_forward_gate_weight, None)
    silu = torch.nn.functional.silu(linear_4)
    linear_5 = torch._C._nn.linear(copy_to_tp_1, layers_0_feed_forward_up_weight, None)
    mul_8 = silu * linear_5
    linear_6 = torch._C._nn.linear(mul_8, layers_0_feed_forward_down_weight, None)
    reduce_from_tp_1 = tpcompile_runtime_mappings_reduce_from_tp(linear_6, '0')
    h_2 = h_1 + reduce_from_tp_1
    float_4 = h_2.float()
    pow_3 = float_4.pow(2)
    mean_2 = pow_3.mean(-1, keepdim = True)
    add_6 = mean_2 + 1e-05
    rsqrt_2 = torch.rsqrt(add_6)
    mul_9 = float_4 * rsqrt_2
    output_2 = mul_9.type_as(h_2)
    h_3 = output_2 * norm_weight
    copy_to_tp_2 = tpcompile_runtime_mappings_copy_to_tp(h_3, '0')
    linear_7 = torch._C._nn.linear(copy_to_tp_2, output_weight, None)
    logits = linear_7.float()
    view_4 = logits.view(-1, 64)
    view_5 = labels.view(-1)
    cross_entropy = tpcompile_runtime_vocab_parallel_vocab_parallel_cross_entropy(view_4, view_5, None, 256, '0', ignore_index = -100, reduction = 'mean', label_smoothing = 0.0)
    return (cross_entropy,)
""")


def test_a_changed_plan_fails_the_golden(tmp_path, monkeypatch):
    """The same check a user runs (tpcompile.testing), on a plan perturbed by one override."""
    golden = tmp_path / "gpt_tp2.txt"
    monkeypatch.setenv("EXPECTTEST_ACCEPT", "1")
    tpcompile.testing.assert_rewrite_matches(_gpt(2), golden=golden)
    monkeypatch.delenv("EXPECTTEST_ACCEPT")
    tpcompile.testing.assert_rewrite_matches(_gpt(2), golden=golden)  # unchanged: passes
    with pytest.raises(AssertionError) as e:
        tpcompile.testing.assert_rewrite_matches(_gpt(2, **{"h.0.mlp.*": "replicate"}), golden=golden)
    diff = str(e.value)
    assert "-h.0.mlp.fc.weight       colwise" in diff and "+h.0.mlp.fc.weight       replicate" in diff
    assert "-forward  all_reduce" in diff and "h.0.mlp.proj" in diff  # the MLP's all-reduce is gone
    assert "EXPECTTEST_ACCEPT=1" in diff
    with pytest.raises(AssertionError, match="no golden file"):
        tpcompile.testing.assert_rewrite_matches(_gpt(2), golden=tmp_path / "missing.txt")


@pytest.mark.gpu
def test_cuda_trace_gives_the_same_golden():
    model, args = gpt.make_model(n_layer=1, device="cuda")
    cuda = tpcompile.explain(model, *args, world_size=2, rank=1).golden()
    cpu = _gpt(2).golden()
    assert cuda.replace("device(type='cuda', index=0)", "device(type='cpu')") == cpu


@pytest.mark.gpu
def test_inductor_cuda_code_calls_the_collectives_and_runtime_ops():
    """Inductor's generated CUDA code: the functional collectives and Triton kernels."""
    from torch._inductor.utils import run_and_get_code

    from fakepg import fake_group

    with fake_group(world_size=2, rank=1):
        model, args = gpt.make_model(n_layer=1, device="cuda")
        model = tpcompile.tp_compile(model)
        _, codes = run_and_get_code(lambda: model(*args).backward())
        (record,) = tpcompile.tp_state(model).records
    code = "\n".join(codes)
    assert "@triton.jit" in code
    assert "_c10d_functional.all_reduce" in code and "_c10d_functional.all_gather_into_tensor" in code
    n_ar = sum(1 for c in record.collectives if c.kind == "all_reduce")
    assert n_ar == 6 and code.count("_c10d_functional.wait_tensor") >= 7
