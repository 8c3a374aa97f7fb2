from baka.models.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, clean_text, load_tokenizer, tokenize


def test_vocab_and_special_tokens():
    tok = load_tokenizer()
    assert len(tok) == VOCAB_SIZE == 49408
    assert tok.convert_tokens_to_ids("<|startoftext|>") == BOS_ID == 49406
    assert tok.convert_tokens_to_ids("<|endoftext|>") == EOS_ID == 49407
    assert tok.pad_token_id == EOS_ID


def test_known_clip_ids():
    # ids of OpenAI CLIP ViT-L/14 for this prompt
    assert load_tokenizer()("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_cleaning_like_openai_clip():
    assert clean_text("  fish &amp;amp; chips \n\t now ") == "fish & chips now"
    assert clean_text("caf\u00c3\u00a9") == "café"  # ftfy repairs mojibake
    assert tokenize("Fish &amp; Chips") == tokenize("fish & chips")


def test_words_and_end_of_word_markers():
    tok = load_tokenizer()
    assert tok.convert_ids_to_tokens(tokenize("1girl, solo")) == ["1</w>", "girl</w>", ",</w>", "solo</w>"]
