# Chat finetuning of OpenAI's GPT-2 124M on Stanford Alpaca (52,002 instruction/input/output
# records), on one GPU (docs/chat.md). Not run here (no GPU, no network when written): the figures
# below are estimates.
#   python prepare.py alpaca  # tatsu-lab/alpaca from the hub (HF_ENDPOINT for a mirror), GPT-2 BPE
#   python train.py config/finetune_gpt2_alpaca.py
#   python chat.py --out_dir=out-alpaca --temperature=0.7
#   # a Hugging Face folder, on which transformers' apply_chat_template works
#   python export_hf.py --out_dir=out-alpaca --hf_dir=gpt2-alpaca
# Needs: ~10 GB of GPU memory at batch 16 x 512 (bf16, activations dominate); ~9.5M tokens per
# epoch, so 32,768 tokens per step make ~290 steps an epoch; 900 steps (~3 epochs) at ~150k
# tokens/s on an A100 is ~4 minutes. The GPT-2 embedding grows by the chat template's 4 tokens
# (50,257 -> 50,304 rows, padded). Expect val loss (assistant tokens only) to fall from ~2.5 to
# ~1.8 and replies that follow the format and stop at <|end|>; 124M parameters know little, so the
# content is often wrong.

out_dir = 'out-alpaca'
init_from = 'gpt2'  # or a local Hugging Face folder of GPT-2's config.json and model.safetensors
dataset = 'alpaca'
eval_interval = 100
eval_iters = 50
log_interval = 10
always_save_checkpoint = False  # keep the best val loss: 3 epochs can overfit

# 'prepare.py alpaca' says how many conversations are longer (they are cut at the row's end)
block_size = 512
batch_size = 16
gradient_accumulation_steps = 4

learning_rate = 6e-5
max_iters = 900
lr_decay_iters = 900
min_lr = 6e-6
warmup_iters = 50
weight_decay = 0.0
dropout = 0.1
