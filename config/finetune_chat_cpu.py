# Chat finetuning on a CPU in minutes (docs/chat.md): the character-level Shakespeare model of
# config/train_shakespeare_char_cpu.py learns a conversation skill (letters_chat: three letters in,
# the same in capitals out; 'again' repeats the last answer, which needs the turn before):
#   python prepare.py shakespeare_char && python train.py config/train_shakespeare_char_cpu.py
#   python prepare.py letters_chat  # the chat template over data/shakespeare_char's 65 characters
#   python train.py config/finetune_chat_cpu.py
#   python chat.py --out_dir=out-chat-cpu --temperature=0
# Only the assistant's tokens are targets; the model keeps the base's shape (4 x 128, RoPE,
# RMSNorm), its embedding grows by the 4 markers (65 -> 69 ids), and the optimizer starts afresh.

out_dir = 'out-chat-cpu'
init_from = 'out-shakespeare-char-cpu/ckpt.pt'  # the base model's checkpoint file
dataset = 'letters_chat'
eval_interval = 100
eval_iters = 10
log_interval = 20
always_save_checkpoint = False

gradient_accumulation_steps = 1
batch_size = 32  # conversations of up to ~35 tokens, packed into rows of 64
block_size = 64

learning_rate = 2e-3  # a quarter of the base's peak: finetuning moves the weights less
max_iters = 300
lr_decay_iters = 300
min_lr = 2e-4
warmup_iters = 20
beta2 = 0.99
dropout = 0.0

device = 'cpu'
dtype = 'auto'
flash = False
compile = False
