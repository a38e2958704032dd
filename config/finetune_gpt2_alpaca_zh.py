# Chat finetuning of OpenAI's GPT-2 124M on alpaca-zh (shibing624/alpaca-zh: Alpaca in Chinese), on
# one GPU (docs/chat.md). Not run here (no GPU, no network when written): the figures
# below are estimates.
#   # shibing624/alpaca-zh from the hub (HF_ENDPOINT for a mirror), GPT-2 BPE
#   python prepare.py alpaca_zh
#   python train.py config/finetune_gpt2_alpaca_zh.py
#   python chat.py --out_dir=out-alpaca-zh --temperature=0.7
#   # a Hugging Face folder, on which transformers' apply_chat_template works
#   python export_hf.py --out_dir=out-alpaca-zh --hf_dir=gpt2-alpaca-zh
# Needs: GPT-2's BPE spends ~1.5-2 tokens per Chinese character (bytes it rarely merged), so a
# record is ~2-3x Alpaca's length in tokens: rows of 1024, ~18 GB of GPU memory at batch 8 x 1024
# (bf16), ~25M tokens an epoch, ~760 steps an epoch at 32,768 tokens a step; 1,500 steps at ~150k
# tokens/s on an A100 is ~6 minutes. GPT-2 saw little Chinese: expect fluent-looking but often wrong
# replies; the format, and stopping at <|end|>, are what it learns. A model pretrained on Chinese
# (with its tokenizer.json) learns far more.

out_dir = 'out-alpaca-zh'
init_from = 'gpt2'  # or a local Hugging Face folder of GPT-2's config.json and model.safetensors
dataset = 'alpaca_zh'
eval_interval = 100
eval_iters = 50
log_interval = 10
always_save_checkpoint = False  # keep the best val loss: 3 epochs can overfit

# 'prepare.py alpaca_zh' says how many conversations are longer (they are cut at the row's end)
block_size = 1024
batch_size = 8
gradient_accumulation_steps = 4

learning_rate = 6e-5
max_iters = 1500
lr_decay_iters = 1500
min_lr = 6e-6
warmup_iters = 50
weight_decay = 0.0
dropout = 0.1
