"""Evaluation and fine-tuning from a Hugging Face directory (a tiny random transformers Llama with
a byte-level BPE tokenizer; nothing downloaded): perplexity equals transformers' own loss, and a
classifier fine-tunes from it and evaluates with the copied tokenizer."""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

SAMPLE = ["def f(x):\n    return x * 2\n", "import os\nprint(os.getcwd())\n", "for i in range(10):\n    pass\n"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    path = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SAMPLE * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         pad_token="<pad>").save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return path, model


def test_perplexity_of_hf_model_matches_transformers(hf_dir, tmp_path):
    import evaluate
    path, model = hf_dir
    text = "".join(SAMPLE)
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "out"
    assert evaluate.main(["lm", str(path), str(tmp_path / "t.txt"), "--seq-len", "128", "--out", str(out)]) == 0
    got = json.loads((out / "metrics.json").read_text())
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = [hf_tok.bos_token_id] + hf_tok.encode(text, add_special_tokens=False) + [hf_tok.eos_token_id]
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert got["tokens"] == len(ids) - 1 and got["bytes"] == len(text.encode())
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(loss * (len(ids) - 1) / (math.log(2) * len(text.encode())), rel=1e-4)


@pytest.mark.slow
def test_classifier_fine_tunes_from_hf_directory(hf_dir, tmp_path):
    import evaluate
    import train
    path, model = hf_dir
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"{'yes' if i % 2 else 'no'} item {i},{i % 2}\n" for i in range(40)))
    run = tmp_path / "run"
    rc = train.main(["configs/tasks/classify.yaml", f"data.path={csv}", f"train.run_dir={run}",
                     f"train.init_from={path}",
                     "train.steps=4", "train.eval_every=0", "train.batch_size=8", "task.max_len=16",
                     "checkpoint.async_save=false"])
    assert rc == 0 and (run / "tokenizer.json").is_file()
    saved = (run / "config.yaml").read_text()
    assert "d_model: 64" in saved and "num_classes: 2" in saved
    assert evaluate.main(["classify", str(run), str(csv), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 40 and np.array(metrics["confusion_matrix"]).sum() == 40
