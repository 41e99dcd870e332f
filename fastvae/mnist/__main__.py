from fastvae.mnist.cli import main

main()
