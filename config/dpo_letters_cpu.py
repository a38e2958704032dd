# Preference tuning with DPO on a CPU in a minute (docs/finetune.md): a model finetuned on
# letters_styles ends its replies with '!' or '.', either as often; DPO on pairs that prefer '!'
# makes it answer with '!' and keeps its letters:
#   python prepare.py shakespeare_char && python train.py config/train_shakespeare_char_cpu.py
#   python prepare.py letters_styles && python prepare.py letters_prefs
#   python train.py config/finetune_chat_cpu.py --dataset=letters_styles --out_dir=out-styles-cpu
#   python train.py config/dpo_letters_cpu.py
#   python chat.py --out_dir=out-dpo-cpu --temperature=0
# DPO moves the policy away from the reference (the finetuned model, frozen: its log-probabilities
# are computed once, at the start) only as far as beta allows; a learning rate as small as this
# is what keeps the letters (docs/finetune.md: when the loss stays at 0.693, or the margin
# explodes).

out_dir = 'out-dpo-cpu'
init_from = 'out-styles-cpu/ckpt.pt'  # the finetuned model: the policy's start and the reference
dataset = 'letters_prefs'  # 1,900 train and 100 val pairs: chosen 'ABC!', rejected 'ABC.'
dpo_beta = 0.1  # the paper's usual value (Rafailov et al. 2023)
eval_interval = 20
eval_iters = 10
log_interval = 10
always_save_checkpoint = False

gradient_accumulation_steps = 1
batch_size = 16  # pairs: 32 rows of a chosen and a rejected conversation
block_size = 64

learning_rate = 3e-5
decay_lr = False
max_iters = 60
beta2 = 0.99
dropout = 0.0

device = 'cpu'
dtype = 'auto'
flash = False
compile = False
