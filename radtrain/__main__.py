from radtrain.cli import entry

entry()
