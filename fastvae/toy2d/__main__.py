from fastvae.toy2d.cli import main

main()
