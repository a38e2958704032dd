# Evaluate OpenAI's GPT-2 350M (24 layers, 16 heads, 1024 wide) on OpenWebText, without training:
#   python prepare.py openwebtext
#   python train.py config/eval_gpt2_medium.py
# Downloads the weights from the Hugging Face hub (HF_ENDPOINT for a mirror), or set
# init_from to a local folder holding config.json and model.safetensors.
batch_size = 8
eval_iters = 500  # more batches: a steadier estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-medium'
out_dir = 'out-eval-gpt2-medium'
