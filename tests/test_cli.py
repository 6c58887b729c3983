from vlm.cli import compose_train, quote_brace_ranges


def test_brace_ranges_pass_through_hydra():
    argv = ["prog", "data=webdataset", "data.train_files=/d/train-{00000..00009}.tar", "data.val_files='/d/v-{0..1}.tar'",
            "trainer.max_steps=3"]
    quoted = quote_brace_ranges(argv)
    assert quoted[:2] == argv[:2] and quoted[3:] == argv[3:]  # only unquoted ranges change
    cfg = compose_train(quoted[1:])
    assert cfg.data.train_files == "/d/train-{00000..00009}.tar" and cfg.data.val_files == "/d/v-{0..1}.tar"
    assert quote_brace_ranges(["k=it's-{1..2}"]) == ['k="it\'s-{1..2}"']
