"""Texts for tokenizer parity tests: every string here is tokenized by llama.cpp (golden files),
by our Rust tokenizer, and, where a reference exists, by Hugging Face `tokenizers`.

Each entry exercises something a tokenizer gets wrong in practice: leading/trailing and runs of
whitespace, digit grouping, contractions, scripts without spaces, multi-codepoint emoji, combining
accents, invalid-looking byte sequences made of valid characters, and literal special-token text
(which must become one id only when parse_special is on, except for user-defined tokens).
"""

CORPUS: list[str] = [
    # empty and whitespace-only
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    " \t \n ",
    "\r\n",
    # prose
    "Hello",
    "Hello world",
    " Hello world",
    "Hello world ",
    "Hello  world",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "I'm sure you'll see they've done it; we'd known he's right. DON'T SHOUT, I'LL GO.",
    "Mr. O'Neil's e-mail: john.doe+test@example.com (see https://example.org/a?b=1&c=2#frag).",
    "Line one\nLine two\n\nLine four after a blank line",
    "   leading spaces and trailing spaces   ",
    "word\t\ttabs\tand   spaces\n  indented",
    # numbers
    "1",
    "12",
    "123",
    "1234",
    "12345678901234567890",
    "3.14159 2,718 -42 +7 1e-10 0x1F 0b1010",
    "In 2024, 1,234,567 people paid $3.50 each (that's 100%).",
    "phone: 555-0123, date 2023-01-15T08:30:00Z",
    # code
    "def main():\n    print(\"hello\")\n    return 0\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}",
    "    if x:\n        y = [1, 2, 3]\n        z = {'a': 1}\n",
    "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
    "<html><body><div class=\"x\">Hi</div></body></html>",
    "SELECT * FROM users WHERE id = 42;",
    "a=b&&c||d!=e==f>=g<=h->i=>j::k",
    "```python\nimport os\n```",
    "#!/bin/bash\necho $HOME | grep -v '^#' > /dev/null 2>&1",
    # accents and combining marks
    "café naïve résumé Zürich São Paulo",
    "cafe\u0301 (combining acute) vs caf\u00e9 (precomposed)",
    "Ångström, Øresund, Łódź, İstanbul, ß, ﬁ ligature",
    "Ελληνικά κείμενα και русский текст, українська мова",
    "עברית ועברית, العربية هنا",
    "हिन्दी भाषा, தமிழ், ภาษาไทย",
    # CJK (no spaces)
    "你好，世界！",
    "我们今天去公园散步，天气非常好。",
    "日本語のテキストです。カタカナとひらがな。",
    "한국어 텍스트입니다.",
    "混合Mixed文本text123数字",
    # emoji (multi-codepoint, ZWJ sequences, flags, skin tones)
    "😀",
    "I ❤️ Rust 🦀 and Python 🐍!",
    "👨‍👩‍👧‍👦 family, 👍🏽 thumbs, 🇫🇷🇯🇵 flags",
    "🤖🤖🤖 three robots",
    # unusual characters
    "\u00a0non-breaking\u00a0space and\u2003em space and\u200bzero width",
    "tab\u000bvtab\u000cformfeed",
    "math: ∀x∈ℝ, ∑ᵢ xᵢ² ≤ ∞ ≠ ∅",
    "symbols: © ® ™ § ¶ † ‡ • … ‰ ′ ″ € £ ¥",
    "\ufeffBOM at start",
    "replacement \ufffd char",
    "private use \ue000 and supplementary \U0001d400\U00020000",
    # repeated characters (merge stress)
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!!!!!!!!??????........",
    "----------------------------------------",
    "ab" * 30,
    # literal special-token text (ChatML for SmolLM2, Gemma turn markers)
    "<|im_start|>",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text before<|endoftext|>text after",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<eos>",
    "<pad>",
    "<unk>",
    "<s> </s>",
    " <|im_start|> spaced special ",
    "<|im_start|><|im_end|><|im_start|>",
    "<start_of_image><end_of_image>",
    "<|not_a_special_token|>",
    "<start_of_turn",
    "<mask> [MASK] [CLS]",
    # mixed
    "Q: What's 7*8?\nA: 56.\n\n---\n\n**Bold** _italic_ `code`",
    "  \n  mixed\n\t\nwhitespace  \n",
]
