# Evaluate OpenAI's GPT-2 124M (12 layers, 12 heads, 768 wide) on OpenWebText, without training:
#   python prepare.py openwebtext
#   python train.py config/eval_gpt2.py
# Downloads the weights from the Hugging Face hub (HF_ENDPOINT for a mirror), or set
# init_from to a local folder holding config.json and model.safetensors.
batch_size = 8
eval_iters = 500  # more batches: a steadier estimate
eval_only = True
wandb_log = False
init_from = 'gpt2'
out_dir = 'out-eval-gpt2'
