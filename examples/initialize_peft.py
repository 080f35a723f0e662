"""LoRA-DA in a few lines (a tiny random Llama, so it runs anywhere in seconds).

Run: python examples/initialize_peft.py
"""
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lora_da

torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2))

# calibration data: any iterable of batches the model accepts (here 16 sequences, 4 per batch)
ids = torch.randint(0, 64, (16, 12))
loader = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones_like(ids[i:i + 4]), "labels": ids[i:i + 4]}
          for i in range(0, 16, 4)]

# 1) the backend other libraries call: statistics -> factors (name -> lora_A [r, n], lora_B [m, r])
cfg = lora_da.LoraDAConfig(rank=4, target_modules=["q_proj", "v_proj"], population_size=10_000)
stats = lora_da.collect_statistics(base, loader, cfg)
factors = lora_da.solve(stats, cfg)
for name, f in factors.items():
    print(f"{name}: lora_A {tuple(f.lora_A.shape)}, lora_B {tuple(f.lora_B.shape)}")

# 2) the drop-in for PEFT: fills the adapter's lora_A / lora_B in place (each layer keeps its own r)
model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"))
report = lora_da.initialize(model, loader, population_size=10_000)
print(report)
