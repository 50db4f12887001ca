from machinable.cli import main

main()
