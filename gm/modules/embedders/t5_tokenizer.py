"""T5's SentencePiece tokenizer (the released `spiece.model`), through the `sentencepiece` library: prompts -> token ids
ending in </s>, padded with <pad> to a fixed length, and the attention mask of the real tokens, as DeepFloyd IF
tokenizes (77 tokens, truncated)."""
import numpy as np


class T5Tokenizer:
    def __init__(self, model_file: str, max_length: int = 77):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.max_length = max_length
        self.eos_id, self.pad_id = self.processor.eos_id(), self.processor.pad_id()
        if self.eos_id < 0 or self.pad_id < 0:
            raise ValueError(f"{model_file} is not a T5 SentencePiece model: it has no </s> or <pad> piece")

    def __call__(self, texts):
        """list of str -> (ids, mask), both (len(texts), max_length) int32."""
        ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), self.max_length), np.int32)
        for row, text in enumerate(texts):
            tokens = self.processor.encode(text)[: self.max_length - 1] + [self.eos_id]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask
