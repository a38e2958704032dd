# LoRA on a CPU in a minute (docs/finetune.md): the letters skill of config/finetune_chat_cpu.py,
# learned by rank-8 adapters on the frozen base (lora.py); only the adapters, the rows of the 4 new
# markers and their Adam moments are trained and saved:
#   python prepare.py shakespeare_char && python train.py config/train_shakespeare_char_cpu.py
#   python prepare.py letters_chat
#   python train.py config/finetune_chat_lora_cpu.py
#   python chat.py --out_dir=out-chat-lora-cpu --temperature=0
# The same settings as the full finetune, but the learning rate: adapters start at zero and move
# alone, so they take a larger one (LoRA's paper, and peft's examples, use 1e-4 to 1e-3 on large
# models; 1e-2 here, for 0.8M parameters).

out_dir = 'out-chat-lora-cpu'
init_from = 'out-shakespeare-char-cpu/ckpt.pt'  # the base, frozen; the checkpoint names it
dataset = 'letters_chat'
eval_interval = 100
eval_iters = 10
log_interval = 20
always_save_checkpoint = False

gradient_accumulation_steps = 1
batch_size = 32  # conversations of up to ~35 tokens, packed into rows of 64
block_size = 64

lora_rank = 8  # adapters on c_attn, c_proj and c_fc of every block
lora_alpha = 16.0  # scale alpha / rank = 2
learning_rate = 1e-2
max_iters = 300
lr_decay_iters = 300
min_lr = 1e-3
warmup_iters = 20
beta2 = 0.99
dropout = 0.0

device = 'cpu'
dtype = 'auto'
flash = False
compile = False
